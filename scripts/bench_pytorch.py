#!/usr/bin/env python3
"""Times diffusers/PyTorch on the shapes `local-diffusers bench` uses, for a side-by-side ratio.

Dev-only (needs torch and diffusers from PyPI). Full-size SD1.5 (or, with --family sdxl, SDXL
base) UNet and VAE built from their configs with random weights: compute cost does not depend on
the weight values.

    python scripts/bench_pytorch.py --json
    python scripts/bench_pytorch.py --family sdxl --json      # 1024x1024 unless --width/--height
    python scripts/bench_pytorch.py --device cuda --precision fp16 --repeats 10
"""
import argparse
import json
import resource
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

# SD1.5's unet/config.json and vae/config.json values that shape the compute.
UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=512,
)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json values that shape the compute.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--no-vae", action="store_true")
    p.add_argument("--no-unet", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="bf16: weights and inputs in bfloat16 (PyTorch's own bf16 CPU kernels)")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs, median reported; above 1 an untimed warm-up goes first")
    a = p.parse_args()
    a.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(a.precision, torch.float32)
    if a.threads:
        torch.set_num_threads(a.threads)
    sdxl = a.family == "sdxl"
    native = 1024 if sdxl else 512
    a.width, a.height = a.width or native, a.height or native
    unet_cfg, vae_cfg = (SDXL_UNET, SDXL_VAE) if sdxl else (UNET, VAE)
    torch.manual_seed(0)
    lh, lw = a.height // 8, a.width // 8
    out = {"family": a.family, "width": a.width, "height": a.height, "batch": a.batch,
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    with torch.inference_mode():
        if not a.no_unet:
            unet_step(a, unet_cfg, sdxl, lh, lw, out)
    if not a.no_vae:
        with torch.inference_mode():
            vae_decode(a, vae_cfg, lh, lw, out)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if a.device == "cuda":
        out["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
        out["gpu"] = torch.cuda.get_device_name()
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:<16} {v}")


def timed(a, f):
    """Median of a.repeats runs of f (after a warm-up when there are several), each waited for:
    GPU work is queued, so a clock read without a synchronize would time only the queueing."""
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    if a.repeats > 1:
        f()
        sync()
    times = []
    for _ in range(max(a.repeats, 1)):
        t = time.perf_counter()
        f()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def build(a, cls, cfg):
    # Built on the target device directly: random initialisation of 2.6 B SDXL weights on the
    # CPU would take longer than the whole GPU benchmark.
    with torch.device(a.device):
        return cls(**cfg).to(a.dtype).eval()


def inp(a, *shape):
    return torch.randn(*shape).to(a.device, a.dtype)


def unet_step(a, unet_cfg, sdxl, lh, lw, out):
    t = time.perf_counter()
    unet = build(a, UNet2DConditionModel, unet_cfg)
    out["unet_build_s"] = time.perf_counter() - t
    x = inp(a, a.batch, 4, lh, lw)
    ctx = inp(a, a.batch, 77, 2048 if sdxl else 768)
    added = None
    if sdxl:
        ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]).repeat(a.batch, 1).to(a.device, a.dtype)
        added = {"text_embeds": inp(a, a.batch, 1280), "time_ids": ids}
    out["unet_step_s"] = timed(
        a, lambda: unet(x, 999, encoder_hidden_states=ctx, added_cond_kwargs=added))


def vae_decode(a, vae_cfg, lh, lw, out):
    t = time.perf_counter()
    vae = build(a, AutoencoderKL, vae_cfg)
    out["vae_build_s"] = time.perf_counter() - t
    z = inp(a, 1, 4, lh, lw)
    out["vae_decode_s"] = timed(a, lambda: vae.decode(z))


if __name__ == "__main__":
    main()
