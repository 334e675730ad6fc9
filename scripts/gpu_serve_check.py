#!/usr/bin/env python3
"""The app's server on a GPU machine: what it detects, and the same jobs whole and staged.

Dev-only, for scripts/gpu_check.sh (stage `serve`). Starts `BIN serve` on the tiny models with a
fresh data folder, prints what /api/v1/system and /api/v1/setup report for the card, then runs one
SDXL + refiner job and one SD1 job with Low graphics-memory mode Off (whole pipeline) and On
(refiner jobs staged: one UNet in VRAM at a time) and compares the pictures of the two runs:
staging changes what is in memory, not the numbers, so they must agree.

    python3 scripts/gpu_serve_check.py BIN OUTDIR
"""
import io
import json
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
from PIL import Image

BIN, OUT = sys.argv[1], sys.argv[2]
JOBS = {
    "sdxl+refiner": dict(model="sdxl", refiner="sdxl-refiner", refiner_switch=0.6),
    "sd1": dict(model="sd1"),
    # The hires fix: latent enlargement (bilinear) and Lanczos through the VAE, on the GPU.
    "sd1+hires": dict(model="sd1", hires=dict(scale=2, steps=3, denoise=0.6)),
    "sdxl+hires-lanczos": dict(model="sdxl", hires=dict(scale=1.5, steps=2, upscaler="Lanczos")),
}


def call(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{method} {path}: HTTP {e.code}: {e.read()[:500]!r}")
    ctype = r.headers.get("Content-Type", "")
    return json.loads(raw) if "json" in ctype else raw


def run_job(base, extra):
    body = dict(prompt="a lighthouse at dusk, oil painting", negative_prompt="blurry",
                steps=6, seed=1234, width=64, height=64, cfg_scale=6.0, **extra)
    job = call(base, "POST", "/api/v1/jobs", body)
    t0 = time.time()
    while not job["state"] in ("done", "failed", "cancelled"):
        if time.time() - t0 > 90:
            raise SystemExit(f"job {job['id']} still {job['state']} after 90 s")
        time.sleep(0.2)
        job = call(base, "GET", f"/api/v1/jobs/{job['id']}")
    secs = time.time() - t0
    print(f"  {extra['model']}{'+hires' if 'hires' in extra else ''}: {job['state']} in {secs:.1f}s, "
          f"{job['width']}x{job['height']}, "
          f"vae={job.get('vae')}, notes={job['notes']}, error={job['error']}")
    if job["state"] != "done":
        return None
    raw = call(base, "GET", f"/api/v1/images/{job['images'][0]['id']}/file")
    picture = Image.open(io.BytesIO(raw))
    print(f"    picture {picture.size[0]}x{picture.size[1]}")
    return np.asarray(picture.convert("RGB"), dtype=np.int16)


def start_server(data, log):
    server = subprocess.Popen([BIN, "--data-dir", data, "serve", "--port", "0",
                               "--models-dir", "models/tiny"],
                              stdout=subprocess.PIPE, stderr=log, text=True)
    for line in server.stdout:
        if "running at" in line:
            return server, line.strip().split()[-1].rstrip("/")
    raise SystemExit("the server did not start; see serve.log")


def main():
    log = open(f"{OUT}/serve.log", "w")
    pictures = {}
    # One server per setting, its settings file written before it starts (changing settings
    # through the API takes the app window's session token).
    for mode in ("off", "on"):
        data = tempfile.mkdtemp(prefix="ld-gpu-")
        with open(f"{data}/settings.json", "w") as f:
            json.dump({"low_vram": mode}, f)
        print(f"== serve, Low graphics-memory mode {mode}", file=log, flush=True)
        server, base = start_server(data, log)
        try:
            if mode == "off":
                system = call(base, "GET", "/api/v1/system")
                print("system:", json.dumps(system)[:1500])
                setup = call(base, "GET", "/api/v1/setup")
                print("setup:", json.dumps(setup)[:800])
            print(f"Low graphics-memory mode {mode}:")
            for name, extra in JOBS.items():
                pictures[(name, mode)] = run_job(base, extra)
        finally:
            server.terminate()
            server.wait(timeout=20)
    for name in JOBS:
        a, b = pictures[(name, "off")], pictures[(name, "on")]
        if a is None or b is None:
            print(f"  {name}: FAILED (a job did not finish)")
            continue
        diff = np.abs(a - b)
        # On a GPU, "On" also moves the text encoders and the VAE to the CPU (f32 there,
        # f16 here), so a few levels apart is expected; a broken staged run is far off.
        verdict = "ok" if diff.mean() < 2 and diff.max() <= 24 else "DIFFERS"
        print(f"  {name}: whole vs Low-VRAM max |diff| {diff.max()} (mean {diff.mean():.3f}) "
              f"of 255: {verdict}")
    log.close()
    stages = [l.strip() for l in open(f"{OUT}/serve.log")
              if any(w in l for w in ("loaded", "freed", "staged", "Loaded", "device", "memory",
                                      "== serve"))]
    print("server log (loading and freeing):")
    for l in stages[-50:]:
        print("   ", l[:220])


if __name__ == "__main__":
    main()
