"""Seconds per ToyWorld UNet call with a gated adapter of n concepts (random factors and gates), no grad.

    .venv/bin/python benchmarks/adapter_speed.py [--concepts 0 10 100] [--batch 8] [--threads 1] [--repeats 5]

Prints one JSON line per n. The adapter's cost grows with n; this measures how fast (docs/SCALE.md).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concepts", type=int, nargs="+", default=[0, 10, 100])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from ace_lightning.method.adapter import inject
    from ace_lightning.models.loading import load_components

    unet = load_components(None).unet
    bank = inject(unet)
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    x = torch.randn(a.batch, unet.config.in_channels, size, size, generator=g)
    emb = torch.randn(a.batch, a.tokens, bank.d, generator=g)
    t = torch.full((a.batch,), 500)
    for n in sorted(a.concepts):
        for i in range(len(bank.concepts), n):
            ad = bank.add_concept(f"c{i}", rank=16, q=8)
            with torch.no_grad():
                ad.A.normal_(generator=g)
                ad.Q = torch.randn(bank.d, 8, generator=g)
        with torch.no_grad():
            unet(x, t, emb)  # warm-up
            t0 = time.perf_counter()
            for _ in range(a.repeats):
                unet(x, t, emb)
        print(json.dumps({"concepts": n, "batch": a.batch, "threads": a.threads,
                          "seconds_per_call": round((time.perf_counter() - t0) / a.repeats, 4)}), flush=True)


if __name__ == "__main__":
    main()
