#!/usr/bin/env python3
"""Times diffusers/PyTorch on the shapes `local-diffusers bench` uses, for a side-by-side ratio.

Dev-only (needs torch and diffusers from PyPI). Full-size SD1.5 UNet and VAE built from their
configs with random weights: compute cost does not depend on the weight values.

    python scripts/bench_pytorch.py --json
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    lh, lw = a.height // 8, a.width // 8
    out = {"width": a.width, "height": a.height, "batch": a.batch,
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    with torch.inference_mode():
        t = time.perf_counter()
        unet = UNet2DConditionModel(**UNET).eval()
        out["unet_build_s"] = time.perf_counter() - t
        x = torch.randn(a.batch, 4, lh, lw)
        ctx = torch.randn(a.batch, 77, 768)
        t = time.perf_counter()
        unet(x, 999, encoder_hidden_states=ctx)
        out["unet_step_s"] = time.perf_counter() - t
        del unet
        t = time.perf_counter()
        vae = AutoencoderKL(**VAE).eval()
        out["vae_build_s"] = time.perf_counter() - t
        z = torch.randn(1, 4, lh, lw)
        t = time.perf_counter()
        vae.decode(z)
        out["vae_decode_s"] = time.perf_counter() - t
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:<16} {v}")


if __name__ == "__main__":
    main()
