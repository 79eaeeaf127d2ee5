"""ACE recipes side by side on one ToyWorld shape, scored with the shipped classifier.

    python benchmarks/toy_shape_ablation.py [--concept circle] [--recipes base methods/ace_ungated ...] [--out DIR]

For each recipe: train on ToyWorld (``make train`` defaults + the recipe), then generate the same prompts with
the same seeds as ``tests/test_toyworld_erasure.py`` (4 templates x 4 colours; DDIM 20 steps, CFG 5) and report
the share drawn as the erased shape on its own prompts and on its synonyms' prompts, and the accuracy on the
other shapes' prompts (95% Wilson intervals). One CSV row per recipe plus a Markdown table in ``--out``.
Runs one training at a time (two cores).
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

TEMPLATES = ["a {}", "a picture of a {}", "a {c} {}", "a drawing of a {c} {}"]
COLORS = ["red", "green", "blue", "yellow"]


def prompts(word: str, n: int) -> list[str]:
    return [TEMPLATES[i % len(TEMPLATES)].format(word, c=COLORS[(i // len(TEMPLATES)) % len(COLORS)]) for i in range(n)]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concept", default="circle")
    ap.add_argument("--recipes", nargs="+", default=["base", "methods/ace_ungated"])
    ap.add_argument("--out", default="outputs/bench_toy_shape_ablation")
    ap.add_argument("--n", type=int, default=24, help="images per group of prompts")
    args = ap.parse_args()

    import torch

    from ace_lightning import apply_adapter, remove_adapter
    from ace_lightning.config import load_config
    from ace_lightning.models.loading import load_components
    from ace_lightning.models.sampling import SamplerSettings, generate
    from ace_lightning.toyworld.classifier import load_classifier
    from ace_lightning.toyworld.world import SHAPES
    from ace_lightning.train import run

    out = Path(args.out)
    pipe = SamplerSettings(steps=20).apply(load_components(None).pipeline())
    clf = load_classifier()
    shape_ix = clf.labels["shape"].index
    others = [s for s in SHAPES if s != args.concept]
    per = max(1, args.n // len(others))
    groups = {
        "concept": (prompts(args.concept, args.n), [shape_ix(args.concept)] * args.n),
        "synonyms": ([p for s in SHAPES[args.concept] for p in prompts(s, args.n // 2)],
                     [shape_ix(args.concept)] * (args.n // 2) * len(SHAPES[args.concept])),
        "others": ([p for s in others for p in prompts(s, per)], [shape_ix(s) for s in others for _ in range(per)]),
    }

    def score() -> dict:
        res = {}
        for g, (ps, labels) in groups.items():
            pred = clf.predict(generate(pipe, ps, list(range(1000, 1000 + len(ps))), 20, 5.0, progress=False))["shape"]
            k = int((pred == torch.tensor(labels)).sum())
            res[g] = (k, len(ps))
        return res

    rows = [{"recipe": "untouched model", "seconds": 0.0, **{g: v for g, v in score().items()}}]
    for recipe in args.recipes:
        name = recipe.replace("/", "_")
        t0 = time.perf_counter()
        overrides = [f"concept={args.concept}", f"output_dir={out}", f"name={name}", "logger.wandb=false",
                     "grid.enabled=false", "trainer.enable_progress_bar=false", "overwrite=true"]
        if recipe != "base":
            overrides.append(f"experiment={recipe}")
        run(load_config(overrides))
        secs = time.perf_counter() - t0
        apply_adapter(pipe, out / name / "adapter.safetensors")
        rows.append({"recipe": recipe, "seconds": secs, **score()})
        remove_adapter(pipe)

    out.mkdir(parents=True, exist_ok=True)
    header = ["recipe", "concept drawn", "synonyms drawn", "others correct", "train+setup s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["recipe", "group", "correct", "n", "share", "ci_lo", "ci_hi", "seconds"])
        for r in rows:
            cells = [r["recipe"]]
            for g in groups:
                k, n = r[g]
                lo, hi = wilson(k, n)
                w.writerow([r["recipe"], g, k, n, k / n, lo, hi, round(r["seconds"], 1)])
                cells.append(f"{k / n:.2f} [{lo:.2f}, {hi:.2f}]")
            cells.append(f"{r['seconds']:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
