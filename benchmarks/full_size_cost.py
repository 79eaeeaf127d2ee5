"""What one ACE training step and the closed form cost at real SD-1.4 and SDXL sizes on this machine (CPU).

    python benchmarks/full_size_cost.py step [--models sd14 sdxl] [--dtypes float32 bfloat16] [--checkpointing off on]
    python benchmarks/full_size_cost.py closed-form [--models sd14 sdxl] [--concepts 1 10 100 1000]

Random-weight UNets from the real architectures (``benchmarks/model_configs.py``), latents 64x64 (SD-1.4) and
128x128 (SDXL), conditioning 77 tokens wide (SDXL: 2048-d plus the pooled row and time ids).

``step`` times the system's step at ``--batch`` erase rows and as many preserve rows: the frozen forward on
3 x batch samples (ε(x_t, c), ε(x_t, c_neutral), ε(x_p, c_p), no grad, adapters off), then the adapted forward and
backward on 2 x batch samples (gradients to the adapter only, one rank-16 gated concept). It reports seconds
per frozen sample and per trained sample, which with the UNet pass counts of a run give any recipe's cost:

    seconds ≈ (fwd_samples - bwd_samples) · frozen_s + bwd_samples · trained_s
    latents of one image at 25 DDIM steps with guidance = 2 · 25 · frozen_s

``closed-form`` times the closed form (shared factor, every concept's edit and factors, gate calibration) over
the model's real attn2 projections (widths read from the architecture on the meta device).

Every scenario runs in its own process (peak RSS is its own); one JSON line each, appended to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_configs import MODELS, build_unet  # noqa: E402

TEXT_LEN = 77


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def conditioning(unet, n: int, g):
    """(n, 77, d) random conditioning; for an SDXL UNet packed with the pooled row and time ids."""
    import torch

    from ace_lightning.models.conditioning import pack, packs_pooled, pooled_width

    c = torch.randn(n, TEXT_LEN, unet.config.cross_attention_dim, generator=g)
    if packs_pooled(unet):
        size = unet.config.sample_size * 8
        c = pack(c, torch.randn(n, pooled_width(unet), generator=g), torch.tensor([size, size, 0, 0, size, size]))
    return c


def step_one(model: str, dtype: str, checkpointing: bool, batch: int, threads: int) -> dict:
    import torch

    from ace_lightning.method.adapter import inject
    from ace_lightning.models.conditioning import unet_eps

    torch.set_num_threads(threads)
    t_build = time.perf_counter()
    unet = build_unet(model, getattr(torch, dtype)).requires_grad_(False).eval()
    if checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints only in training mode (no dropout in these blocks)
    bank = inject(unet)
    ad = bank.add_concept("concept", rank=16, q=8)
    t_build = time.perf_counter() - t_build
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    x = torch.randn(3 * batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.randint(0, 1000, (3 * batch,), generator=g)
    c = conditioning(unet, 3 * batch, g)
    with torch.no_grad(), bank.disabled():
        t0 = time.perf_counter()
        frozen = unet_eps(unet, x, t, c).float()  # (3B, 4, h, w)
        t_frozen = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = unet_eps(unet, x[: 2 * batch], t[: 2 * batch], c[: 2 * batch]).float()
    loss = (pred - frozen[: 2 * batch]).pow(2).mean()
    loss.backward()
    t_trained = time.perf_counter() - t0
    grads = [p.grad for p in ad.parameters() if p.grad is not None]
    assert grads and all(gr.isfinite().all() for gr in grads), "the adapter got no (finite) gradient"
    return {"what": "step", "model": model, "dtype": dtype, "checkpointing": checkpointing, "batch": batch,
            "latent": cfg.sample_size, "threads": torch.get_num_threads(),
            "unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
            "build_seconds": round(t_build, 1), "frozen_seconds": round(t_frozen, 2),
            "trained_seconds": round(t_trained, 2), "step_seconds": round(t_frozen + t_trained, 2),
            "frozen_s_per_sample": round(t_frozen / (3 * batch), 3),
            "trained_s_per_sample": round(t_trained / (2 * batch), 3),
            "latent_image_seconds_25_steps": round(2 * 25 * t_frozen / (3 * batch), 1),
            "peak_rss_gib": round(_rss_gib(), 2)}


def attn2_widths(model: str) -> list[int]:
    """Output widths of every attn2 to_k / to_v of the architecture (meta device: no memory)."""
    unet = build_unet(model, device="meta")
    return [m.out_features for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]


def closed_form_one(model: str, concepts: int, threads: int, tokens: int = 64, preserve: int = 512,
                    rank: int = 16, gate_q: int = 8) -> dict:
    import torch

    from ace_lightning.method import gate as G
    from ace_lightning.method.closed_form import EditedWeights, preserve_factor, solve_concepts

    torch.set_num_threads(threads)
    widths = attn2_widths(model)
    d = MODELS[model]["unet"]["cross_attention_dim"]
    g = torch.Generator().manual_seed(0)
    weights = {f"l{i}": torch.randn(o, d, generator=g) / d**0.5 for i, o in enumerate(widths)}
    P = torch.randn(d, preserve, generator=g)
    pairs = [(torch.randn(d, tokens, generator=g), torch.randn(d, tokens, generator=g)) for _ in range(concepts)]
    f0 = preserve_factor(P[:8, :4], 8, 0.1, 1.0)  # warm-up: loads the LAPACK kernels
    G.contrast_directions(pairs[0][0][:8, :4], 2, G.preserve_whitener(P[:8, :8]))
    del f0
    t0 = time.perf_counter()
    factor = preserve_factor(P, d, 0.1, 1.0)
    Wh = G.preserve_whitener(P)
    stacked = EditedWeights.stack(weights)
    P_hat = G.unit_columns(P)
    t_shared = time.perf_counter() - t0
    results = solve_concepts(stacked, pairs, factor, 1.0, rank)
    t_solve = time.perf_counter() - t0
    for (C, _), res in zip(pairs, results):
        Q = G.contrast_directions(C, gate_q, Wh)
        G.calibrate(G.scores(Q, C), G.scores(Q, P_hat, unit=True))
        assert res.A.shape == (rank, d)
    total = time.perf_counter() - t0
    return {"what": "closed_form", "model": model, "concepts": concepts, "d": d, "projections": len(widths),
            "sum_out": sum(widths), "threads": torch.get_num_threads(), "seconds_total": round(total, 3),
            "seconds_shared": round(t_shared, 3), "seconds_solve_and_B": round(t_solve - t_shared, 3),
            "seconds_gates": round(total - t_solve, 3), "ms_per_concept": round(1000 * (total - t_shared) / concepts, 1),
            "peak_rss_gib": round(_rss_gib(), 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["step", "closed-form"])
    ap.add_argument("--models", nargs="+", default=["sd14", "sdxl"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--batch", type=int, default=1, help="erase rows per step (the recipe uses 4)")
    ap.add_argument("--concepts", type=int, nargs="+", default=[1, 10, 100, 1000])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per scenario")
    ap.add_argument("--out", default="outputs/bench/perf/full_size_cost.jsonl")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._one:
        kw = json.loads(a._one)
        fn = step_one if kw.pop("fn") == "step" else closed_form_one
        print(json.dumps(fn(**kw)), flush=True)
        return
    if a.what == "step":
        jobs = [dict(fn="step", model=m, dtype=dt, checkpointing=ck == "on", batch=a.batch, threads=a.threads)
                for m in a.models for dt in a.dtypes for ck in a.checkpointing]
    else:
        jobs = [dict(fn="closed_form", model=m, concepts=n, threads=a.threads) for m in a.models for n in a.concepts]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        t0 = time.perf_counter()
        try:
            res = subprocess.run([sys.executable, __file__, a.what, "--_one", json.dumps(job)], capture_output=True,
                                 text=True, timeout=a.timeout)
            lines = res.stdout.strip().splitlines()
            if res.returncode == 0 and lines:
                row = json.loads(lines[-1])
            elif res.returncode < 0:  # a signal: -9 is what the kernel's out-of-memory killer sends
                row = {**job, "error": f"killed by signal {-res.returncode}" + (" (out of memory?)" if res.returncode == -9 else "")}
            else:
                row = {**job, "error": f"exit {res.returncode}: {(res.stderr.strip().splitlines() or [''])[-1][:200]}"}
        except subprocess.TimeoutExpired:
            row = {**job, "error": f"timed out after {a.timeout:.0f} s"}
        row["wall_seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        with out.open("a") as f:  # one line per finished scenario: a stopped run keeps what it measured
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
