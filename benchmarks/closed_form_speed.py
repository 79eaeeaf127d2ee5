"""Wall time and peak memory of ACE stage 1 (closed form + factorisation + gate calibration) at SD-1.4 sizes.

    python benchmarks/closed_form_speed.py [--concepts 1 10 100] [--tokens 64] [--preserve 512] [--rank 16]

SD-1.4 has 16 attn2 blocks (o = 320 x5, 640 x5, 1280 x6), so 32 projections (to_k, to_v) with d_text = 768.
Random weights and embeddings (the cost does not depend on the values). Each scenario runs in a fresh
process so its peak RSS is its own; one CSV row per scenario.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SD14_OUT = [320] * 5 + [640] * 5 + [1280] * 6  # attn2 output widths per block


@dataclass
class Scenario:
    concepts: int
    tokens: int = 64  # n_k: target tokens per concept (32 prompts x last+eos)
    preserve: int = 512  # m: preserve token columns
    d: int = 768
    rank: int = 16
    gate_q: int = 8
    threads: int = 1  # torch intra-op threads


def run_one(s: Scenario) -> dict:
    import torch

    from ace_lightning.method import gate as G
    from ace_lightning.method.closed_form import EditedWeights, preserve_factor, solve_concept, solve_concepts

    torch.set_num_threads(s.threads)
    g = torch.Generator().manual_seed(0)
    weights = {f"b{i}.{p}": torch.randn(o, s.d, generator=g) / s.d**0.5 for i, o in enumerate(SD14_OUT) for p in ("k", "v")}
    P = torch.randn(s.d, s.preserve, generator=g)
    Cs = [torch.randn(s.d, s.tokens, generator=g) for _ in range(s.concepts)]
    Ns = [torch.randn(s.d, s.tokens, generator=g) for _ in range(s.concepts)]
    # warm-up on toy sizes: loads the LAPACK kernels, so the timing is the steady-state cost
    f0 = preserve_factor(P[:8, :4], 8, 0.1, 1.0)
    solve_concept({"w": weights["b0.k"][:, :8]}, Cs[0][:8, :2], Ns[0][:8, :2], f0, 1.0, 2)
    G.contrast_directions(Cs[0][:8, :4], 2, G.preserve_whitener(P[:8, :8]))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    factor = preserve_factor(P, s.d, 0.1, 1.0)  # once for every concept and layer
    Wh = G.preserve_whitener(P)  # once for every concept's gate (default 'contrast' directions)
    stacked = EditedWeights.stack(weights)
    P_hat = G.unit_columns(P)
    t_factor = time.perf_counter() - t0
    results = solve_concepts(stacked, list(zip(Cs, Ns)), factor, 1.0, s.rank)  # D_k, SVD, and every B_k^l
    t_solve = time.perf_counter() - t0
    for C, res in zip(Cs, results):
        Q = G.contrast_directions(C, s.gate_q, Wh)
        G.calibrate(G.scores(Q, C), G.scores(Q, P_hat, unit=True))
        assert res.A.shape == (s.rank, s.d)
    total = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {**asdict(s), "projections": len(weights), "seconds_total": round(total, 4),
            "seconds_shared": round(t_factor, 4),
            "seconds_solve_and_B": round(t_solve - t_factor, 4), "seconds_gates": round(total - t_solve, 4), "ms_per_concept": round(1000 * (total - t_factor) / s.concepts, 2),
            "peak_rss_mb": round(rss1 / 1024, 1), "rss_growth_mb": round((rss1 - rss0) / 1024, 1),
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--preserve", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="outputs/bench/perf/closed_form_speed.csv")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._one:
        print(json.dumps(run_one(Scenario(**json.loads(a._one)))))
        return
    rows = []
    for n, th in [(n, th) for th in a.threads for n in a.concepts]:
        s = Scenario(concepts=n, tokens=a.tokens, preserve=a.preserve, rank=a.rank, threads=th)
        out = subprocess.run([sys.executable, __file__, "--_one", json.dumps(asdict(s))], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{n:4d} concepts, {th} thread(s): {rows[-1]['seconds_total']:.3f} s total, {rows[-1]['ms_per_concept']:.1f} ms/concept, "
              f"peak RSS {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
