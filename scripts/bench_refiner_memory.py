#!/usr/bin/env python3
"""Peak memory of an SDXL picture with and without the refiner: `local-diffusers generate`, staged.

Dev-only (needs torch, diffusers and transformers from PyPI to write the models, e.g.
/opt/refvenv). Issue 12: a staged run loads the refiner's UNet only after the base's is freed,
so the refiner should add little to the peak, where a whole pipeline holds both UNets. This
writes full-size SDXL 1.0 base and refiner diffusers folders with seeded random fp16 weights
once (about 13 GB; memory and load costs do not depend on the values), from our embedded
configs (crates/engine/assets), then runs our `generate` on them with `/usr/bin/time`: without
the refiner, with it, and with it in `--low-memory` mode. It prints the peak resident memory of
each and, for comparison, what a whole pipeline's weights alone come to (every model resident at
once, f16 storage as ours keeps fp16 files).

    cargo build --release -p ld-server
    /opt/refvenv/bin/python scripts/bench_refiner_memory.py --ours target/release/local-diffusers
"""
import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "crates/engine/assets"


def cfg(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def random_f16(module_cls, *args, **kwargs):
    """`module_cls(*args)` with seeded random fp16 weights, built without an fp32 copy (meta
    tensors first), std 0.02 so that activations stay finite."""
    import torch

    with torch.device("meta"):
        m = module_cls(*args, **kwargs)
    m = m.to(dtype=torch.float16).to_empty(device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.02)
        for b in m.buffers():
            if b.is_floating_point():
                b.zero_()
    # Buffers such as CLIP's position ids are integers; rebuild them as the constructor would.
    if hasattr(m, "text_model"):
        emb = m.text_model.embeddings
        n = emb.position_embedding.num_embeddings
        emb.position_ids = torch.arange(n).expand((1, -1))
    return m


def tokenizer(dest: Path, pad: str) -> None:
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as t:
        vocab, merges = Path(t) / "vocab.json", Path(t) / "merges.txt"
        vocab.write_bytes(gzip.decompress((ASSETS / "clip/vocab.json.gz").read_bytes()))
        merges.write_bytes(gzip.decompress((ASSETS / "clip/merges.txt.gz").read_bytes()))
        CLIPTokenizer(str(vocab), str(merges), pad_token=pad, model_max_length=77).save_pretrained(dest)


def make_folders(root: Path) -> tuple[Path, Path]:
    """`root/sdxl-base-random` and `root/sdxl-refiner-random`, written once."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    base, refiner = root / "sdxl-base-random", root / "sdxl-refiner-random"
    sd = ASSETS / "sdxl-base"
    torch.manual_seed(0)
    scheduler = EulerDiscreteScheduler.from_config(cfg(sd / "scheduler.json"))
    text_2 = CLIPTextConfig(**cfg(sd / "text_encoder_2.json"))
    if not base.exists():
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
        random_f16(UNet2DConditionModel, **cfg(sd / "unet.json")).save_pretrained(tmp / "unet")
        random_f16(AutoencoderKL, **cfg(sd / "vae.json")).save_pretrained(tmp / "vae")
        random_f16(CLIPTextModel, CLIPTextConfig(**cfg(sd / "text_encoder.json"))).save_pretrained(
            tmp / "text_encoder")
        random_f16(CLIPTextModelWithProjection, text_2).save_pretrained(tmp / "text_encoder_2")
        scheduler.save_pretrained(tmp / "scheduler")
        tokenizer(tmp / "tokenizer", "<|endoftext|>")
        tokenizer(tmp / "tokenizer_2", "!")
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": True,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }, indent=2))
        # Renamed only when complete, so an interrupted run never leaves a half folder to reuse.
        tmp.rename(base)
    if not refiner.exists():
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
        random_f16(UNet2DConditionModel, **cfg(ASSETS / "sdxl-refiner/unet.json")).save_pretrained(
            tmp / "unet")
        random_f16(CLIPTextModelWithProjection, text_2).save_pretrained(tmp / "text_encoder_2")
        scheduler.save_pretrained(tmp / "scheduler")
        tokenizer(tmp / "tokenizer_2", "!")
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            "force_zeros_for_empty_prompt": False,
            "requires_aesthetics_score": True,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": [None, None],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": [None, None],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
        }, indent=2))
        tmp.rename(refiner)
    return base, refiner


def weight_bytes(folder: Path, components: list[str]) -> int:
    return sum(f.stat().st_size for c in components for f in (folder / c).glob("*.safetensors"))


def warm_cache(folder: Path) -> None:
    for f in folder.rglob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def run_ours(a, base: Path, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as t:
        cmd = ["/usr/bin/time", "-f", "MAXRSS %M", a.ours, "--data-dir", t, "generate",
               "a photo of a cat", "--model", str(base), "--steps", str(a.steps), "--cfg", "7",
               "--width", str(a.size), "--height", str(a.size), "--seed", "1",
               "--precision", "fp32", "--out", str(Path(t) / "out.png"), *extra]
        env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads),
                   RUST_LOG="ld_engine::pipeline::staged=debug")
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        total = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"local-diffusers failed:\n{r.stderr}")
    err = re.sub(r"\x1b\[[0-9;]*m", "", r.stderr)
    rss = int(re.search(r"MAXRSS (\d+)", err).group(1)) / 1024
    # The staged run's debug log: resident and peak memory at each stage boundary.
    stages = re.findall(r"staged: ([^:]+): resident ([0-9]+ kB), peak ([0-9]+ kB)", err)
    return {"total_s": round(total, 1), "peak_rss_mb": round(rss), "stages": stages}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ours", required=True, help="the local-diffusers binary to measure")
    p.add_argument("--root", type=Path, default=Path.home() / ".cache/local-diffusers-bench")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--switch", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    a.root.mkdir(parents=True, exist_ok=True)
    base, refiner = make_folders(a.root)
    warm_cache(base)
    warm_cache(refiner)
    with_refiner = ["--refiner", str(refiner), "--refiner-switch", str(a.switch)]
    runs = {
        "base only": run_ours(a, base, []),
        "with refiner": run_ours(a, base, with_refiner),
        "with refiner, --low-memory": run_ours(a, base, with_refiner + ["--low-memory"]),
    }
    print(f"SDXL {a.size}x{a.size}, {a.steps} steps, refiner from {a.switch}, fp32 compute on "
          f"the CPU, {a.threads} threads; random fp16 weights")
    for name, r in runs.items():
        print(f"  {name:28} peak {r['peak_rss_mb'] / 1024:6.2f} GB   {r['total_s']:6.1f} s")
        for stage, resident, peak in r["stages"]:
            print(f"      {stage:40} resident {resident:>12}  peak {peak:>12}")
    gb = 1 << 30
    held = (weight_bytes(base, ["text_encoder", "text_encoder_2", "unet", "vae"])
            + weight_bytes(refiner, ["text_encoder_2", "unet"]))
    print(f"  whole pipeline with refiner, weights alone (fp16 files as stored): {held / gb:.2f} GB")


if __name__ == "__main__":
    main()
