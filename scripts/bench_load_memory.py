#!/usr/bin/env python3
"""Load time and peak memory of one 512x512 SD1.5 generation: ours beside diffusers, same folder.

Dev-only (needs torch, diffusers and transformers from PyPI, e.g. /opt/refvenv). Issue 12 asks
for "load to first step <= 0.5 of diffusers" and "peak RSS <= 0.7 of diffusers"; this measures
both on a full-size SD1.5 diffusers folder with random weights (load and memory costs do not
depend on the weight values), which it writes once from our embedded SD1.5 configs
(crates/engine/assets/sd15) and CLIP vocabulary.

Each side runs in a fresh process: ours is `local-diffusers generate` (built beforehand), timed
by the lines it prints and measured by /usr/bin/time; diffusers runs a child of this script that
reports its own timings and `ru_maxrss`. Both use float32 on the CPU, the same sampler family,
steps, size, CFG and thread count; the file cache is warmed first so neither side pays for the
first read from disk.

With `--device cuda` (a `cuda` build of ours) both sides draw in fp16 on the GPU, and each
side's peak GPU memory is read with nvidia-smi every 20 ms over its whole process (CUDA context
and allocator caches included: what the card has left for anything else).

    cargo build --release -p ld-server
    /opt/refvenv/bin/python scripts/bench_load_memory.py --ours target/release/local-diffusers
    python3 scripts/bench_load_memory.py --ours BIN --device cuda --steps 20
"""
import argparse
import gzip
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "crates/engine/assets"


def make_folder(dest: Path) -> None:
    """A full-size SD1.5 diffusers folder with seeded random weights, fp32 safetensors."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".partial-"))
    torch.manual_seed(0)

    def cfg(name):
        c = json.loads((ASSETS / "sd15" / name).read_text())
        return {k: v for k, v in c.items() if not k.startswith("_")}

    UNet2DConditionModel(**cfg("unet.json")).save_pretrained(tmp / "unet")
    AutoencoderKL(**cfg("vae.json")).save_pretrained(tmp / "vae")
    CLIPTextModel(CLIPTextConfig(**cfg("text_encoder.json"))).save_pretrained(tmp / "text_encoder")
    PNDMScheduler.from_config(cfg("scheduler.json")).save_pretrained(tmp / "scheduler")
    with tempfile.TemporaryDirectory() as t:
        vocab, merges = Path(t) / "vocab.json", Path(t) / "merges.txt"
        vocab.write_bytes(gzip.decompress((ASSETS / "clip/vocab.json.gz").read_bytes()))
        merges.write_bytes(gzip.decompress((ASSETS / "clip/merges.txt.gz").read_bytes()))
        CLIPTokenizer(str(vocab), str(merges), pad_token="<|endoftext|>", model_max_length=77).save_pretrained(tmp / "tokenizer")
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }, indent=2))
    # Renamed only when complete, so an interrupted run never leaves a half folder to reuse.
    tmp.rename(dest)


def warm_cache(folder: Path) -> None:
    for f in folder.rglob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def diffusers_child(folder: str, steps: int, size: int, threads: int, device: str) -> None:
    """Runs in its own process: load, time to the first step, whole generation, peak RSS."""
    t0 = time.perf_counter()
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    imports = time.perf_counter() - t0
    torch.set_num_threads(threads)
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None)
    pipe = pipe.to(device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter() - t0
    first = {}

    def on_step(p, i, t, kw):
        if device == "cuda":
            torch.cuda.synchronize()
        first.setdefault("step", time.perf_counter() - t0)
        return kw

    pipe("a photo of a cat", num_inference_steps=steps, guidance_scale=7.0, width=size, height=size,
         generator=torch.Generator().manual_seed(1), callback_on_step_end=on_step)
    if device == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    print(json.dumps({"load_s": loaded, "imports_s": imports, "first_step_s": first["step"], "total_s": total,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


class GpuPeak:
    """Peak GPU memory in use while a block runs, minus what was in use before (nvidia-smi)."""

    def __init__(self, device: str):
        self.on, self.peak_mib = device == "cuda", None

    def __enter__(self):
        if self.on:
            self.log = tempfile.NamedTemporaryFile("w+", suffix=".csv")
            self.smi = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used",
                                         "--format=csv,noheader,nounits", "-lms", "20"],
                                        stdout=self.log, text=True)
            time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        if self.on:
            time.sleep(0.3)
            self.smi.terminate()
            self.smi.wait()
            self.log.seek(0)
            used = [int(x) for x in self.log.read().split() if x.isdigit()]
            self.peak_mib = max(used) - used[0] if used else None


def run_diffusers(folder: Path, a) -> dict:
    with GpuPeak(a.device) as g:
        out = subprocess.run([sys.executable, __file__, "--child", str(folder), "--steps", str(a.steps),
                              "--size", str(a.size), "--threads", str(a.threads),
                              "--device", a.device], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["gpu_mib"] = g.peak_mib
    return r


def run_ours(folder: Path, a, low_memory: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as t:
        cmd = [a.ours, "--data-dir", t, "generate",
               "a photo of a cat", "--model", str(folder), "--steps", str(a.steps), "--cfg", "7",
               "--width", str(a.size), "--height", str(a.size), "--seed", "1",
               "--precision", "fp16" if a.device == "cuda" else "fp32",
               "--out", str(Path(t) / "out.png")]
        if low_memory:
            cmd.append("--low-memory")
        env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
        with GpuPeak(a.device) as g, open(Path(t) / "err.log", "w+") as err:
            t0 = time.perf_counter()
            child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
            # wait4 gives this child's own peak RSS (no /usr/bin/time needed).
            _, status, usage = os.wait4(child.pid, 0)
            total = time.perf_counter() - t0
            err.seek(0)
            stderr = err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"local-diffusers failed:\n{stderr}")
    # With --low-memory ours loads one model at a time, so "Loaded" is printed when the UNet is
    # ready: it includes loading and running the text encoder (diffusers' load does not).
    loaded = float(re.search(r"Loaded in ([0-9.]+)s", stderr).group(1))
    rss = usage.ru_maxrss / 1024
    # Ours prints no per-step time; one step is (total - load - decode) / steps, so report the
    # whole run beside diffusers' and the load time, which is what the goal names.
    return {"load_s": loaded, "total_s": total, "peak_rss_mb": rss, "gpu_mib": g.peak_mib}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ours", help="the local-diffusers binary to measure")
    p.add_argument("--folder", type=Path, default=Path.home() / ".cache/local-diffusers-bench/sd15-random")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--low-memory", action="store_true",
                   help="also run ours with --low-memory (f16 weight storage), interleaved")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: both sides in fp16 on the GPU (ours must be a cuda build)")
    p.add_argument("--child")
    a = p.parse_args()
    if a.child:
        return diffusers_child(a.child, a.steps, a.size, a.threads, a.device)
    if not a.ours:
        sys.exit("--ours PATH (a built local-diffusers binary) is required")
    if not a.folder.exists():
        a.folder.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing a random-weight SD1.5 folder to {a.folder} (once) ...", file=sys.stderr)
        make_folder(a.folder)
        # Start afresh: this process now holds gigabytes of torch tensors, and a child forked
        # from it starts with that as its peak RSS (every run read 4096 MB, low-memory too).
        os.execv(sys.executable, [sys.executable, *sys.argv])
    warm_cache(a.folder)
    rows = []
    # Interleaved, so a burst of load on the machine hits both sides alike.
    for i in range(a.repeat):
        d, o = run_diffusers(a.folder, a), run_ours(a.folder, a)
        low = run_ours(a.folder, a, low_memory=True) if a.low_memory else None
        print(f"run {i + 1}: diffusers {d}\n       ours      {o}", file=sys.stderr)
        if low:
            print(f"       ours low  {low}", file=sys.stderr)
        rows.append((d, o, low))

    def med(side, key):
        v = sorted(r[side][key] for r in rows)
        return v[len(v) // 2]

    load_d, load_o = med(0, "load_s"), med(1, "load_s")
    rss_d, rss_o = med(0, "peak_rss_mb"), med(1, "peak_rss_mb")
    tot_d, tot_o = med(0, "total_s"), med(1, "total_s")
    where = "fp16 GPU" if a.device == "cuda" else "fp32 CPU"
    print(f"SD1.5 {a.size}x{a.size}, {a.steps} steps, CFG 7, {where}, {a.threads} threads, "
          f"median of {a.repeat} (load average {os.getloadavg()[0]:.1f})")
    print(f"{'':22}{'ours':>10}{'diffusers':>12}{'ratio':>8}")
    print(f"{'load (s)':22}{load_o:10.1f}{load_d:12.1f}{load_o / load_d:8.2f}")
    # Python's own start (importing torch and diffusers) is part of diffusers' load above; the
    # fairer figure for the library itself leaves it out (ours has no such step).
    load_di = load_d - med(0, "imports_s")
    print(f"{'  without imports':22}{load_o:10.1f}{load_di:12.1f}{load_o / load_di:8.2f}")
    print(f"{'peak RSS (MB)':22}{rss_o:10.0f}{rss_d:12.0f}{rss_o / rss_d:8.2f}")
    print(f"{'whole run (s)':22}{tot_o:10.1f}{tot_d:12.1f}{tot_o / tot_d:8.2f}")
    if a.device == "cuda":
        gpu_d, gpu_o = med(0, "gpu_mib"), med(1, "gpu_mib")
        print(f"{'peak GPU memory (MiB)':22}{gpu_o:10.0f}{gpu_d:12.0f}{gpu_o / gpu_d:8.2f}")
    if a.low_memory:
        rss_l, tot_l, load_l = med(2, "peak_rss_mb"), med(2, "total_s"), med(2, "load_s")
        print(f"{'--low-memory:':22}")
        print(f"{'  load (s)':22}{load_l:10.1f}{load_d:12.1f}{load_l / load_d:8.2f}")
        print(f"{'  peak RSS (MB)':22}{rss_l:10.0f}{rss_d:12.0f}{rss_l / rss_d:8.2f}")
        print(f"{'  whole run (s)':22}{tot_l:10.1f}{tot_d:12.1f}{tot_l / tot_d:8.2f}")
    print(f"(diffusers' time to its first step: {med(0, 'first_step_s'):.1f} s)")


if __name__ == "__main__":
    main()
