#!/usr/bin/env python3
"""Times single PyTorch ops on the shapes of one SD1.5 UNet step (512x512, batch 2) and VAE
decode, for a per-op comparison with `local-diffusers bench --ops` (same case names, same order).

Dev-only (needs torch). Prints one JSON object: {"case name": median seconds, ...}.

    python scripts/bench_ops_pytorch.py --threads 2 --repeats 5
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def conv(cin, cout, k, hw, batch, stride=1):
    x = torch.randn(batch, cin, hw, hw)
    w = torch.randn(cout, cin, k, k) * (cin * k * k) ** -0.5
    b = torch.randn(cout) * 0.02
    return lambda: F.conv2d(x, w, b, stride=stride, padding=k // 2)


def attn(tokens, keys, heads, dim, batch):
    inner = heads * dim
    q = torch.randn(batch, tokens, inner)
    k = torch.randn(batch, keys, inner)
    v = torch.randn(batch, keys, inner)

    def run():
        # diffusers' AttnProcessor2_0: view + transpose, SDPA, transpose back.
        sp = lambda t: t.view(batch, -1, heads, dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(sp(q), sp(k), sp(v))
        return o.transpose(1, 2).reshape(batch, -1, inner)

    return run


def linear(rows, cin, cout, batch):
    x = torch.randn(batch, rows, cin)
    w = torch.randn(cout, cin) * cin ** -0.5
    b = torch.randn(cout) * 0.02
    return lambda: F.linear(x, w, b)


def group_norm_silu(c, hw, batch):
    x = torch.randn(batch, c, hw, hw)
    w, b = torch.ones(c), torch.zeros(c)
    return lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5))


def layer_norm(rows, c, batch):
    x = torch.randn(batch, rows, c)
    w, b = torch.ones(c), torch.zeros(c)
    return lambda: F.layer_norm(x, (c,), w, b, 1e-5)


def geglu(rows, c, batch):
    x = torch.randn(batch, rows, 2 * c)
    def run():
        h, g = x.chunk(2, dim=-1)
        return h * F.gelu(g)
    return run


# Keep names and shapes in step with `ld_engine::bench::op_cases`.
CASES = [
    ("unet conv3x3 320->320 64x64 b2", lambda: conv(320, 320, 3, 64, 2)),
    ("unet conv3x3 960->320 64x64 b2", lambda: conv(960, 320, 3, 64, 2)),
    ("unet conv3x3 640->640 32x32 b2", lambda: conv(640, 640, 3, 32, 2)),
    ("unet conv3x3 1280->1280 32x32 b2", lambda: conv(1280, 1280, 3, 32, 2)),
    ("unet conv3x3 1280->1280 16x16 b2", lambda: conv(1280, 1280, 3, 16, 2)),
    ("unet conv3x3 2560->1280 8x8 b2", lambda: conv(2560, 1280, 3, 8, 2)),
    ("unet conv1x1 960->320 64x64 b2", lambda: conv(960, 320, 1, 64, 2)),
    ("unet conv3x3 stride 2 320->320 64x64 b2", lambda: conv(320, 320, 3, 64, 2, stride=2)),
    ("unet self-attn 4096 tok 8x40 b2", lambda: attn(4096, 4096, 8, 40, 2)),
    ("unet cross-attn 4096x77 8x40 b2", lambda: attn(4096, 77, 8, 40, 2)),
    ("unet self-attn 1024 tok 8x80 b2", lambda: attn(1024, 1024, 8, 80, 2)),
    ("sdxl self-attn 4096 tok 10x64 b2", lambda: attn(4096, 4096, 10, 64, 2)),
    ("unet linear 320->320 4096 tok b2", lambda: linear(4096, 320, 320, 2)),
    ("unet linear 320->2560 4096 tok b2", lambda: linear(4096, 320, 2560, 2)),
    ("unet linear 1280->320 4096 tok b2", lambda: linear(4096, 1280, 320, 2)),
    ("unet groupnorm+silu 320 64x64 b2", lambda: group_norm_silu(320, 64, 2)),
    ("unet layernorm 320 4096 tok b2", lambda: layer_norm(4096, 320, 2)),
    ("unet geglu 1280 4096 tok b2", lambda: geglu(4096, 1280, 2)),
    ("vae conv3x3 512->512 64x64", lambda: conv(512, 512, 3, 64, 1)),
    ("vae conv3x3 512->512 128x128", lambda: conv(512, 512, 3, 128, 1)),
    ("vae conv3x3 256->256 256x256", lambda: conv(256, 256, 3, 256, 1)),
    ("vae conv3x3 128->128 512x512", lambda: conv(128, 128, 3, 512, 1)),
    ("vae self-attn 4096 tok 1x512", lambda: attn(4096, 4096, 1, 512, 1)),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--filter", default="", help="only cases whose name contains this")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = {}
    with torch.inference_mode():
        for name, make in CASES:
            if a.filter not in name:
                continue
            f = make()
            f()  # warm-up: first-call allocations and kernel selection
            times = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                f()
                times.append(time.perf_counter() - t)
            out[name] = statistics.median(times)
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                      "median_s": out}))


if __name__ == "__main__":
    main()
