"""Erase ToyWorld shapes or styles with a recipe and measure every class on held-out bare / synonym / modifier prompts.

    python benchmarks/toy_generic_recipe.py --erase circle [--erase star,heart,cross ...] [--kind shape|style]
        [--args "data.template_family=toyworld ..."] [--n 12] [--out outputs/bench_generic]

Each ``--erase`` value is one run (one adapter for its comma-separated concepts), trained one at a time with the
default recipe plus ``--args``. Scoring: ``ace_lightning.toyworld.erasure_eval`` (held-out frames, colours and
styles before the noun, seeds 50000+; the shipped classifier). Writes ``results.md`` / ``results.json`` in --out:
per run, per class ``base → erased`` for each group, the worst cases, seconds and the gate's false-fire rate.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--erase", action="append", required=True, help="comma-separated concepts of one run")
    ap.add_argument("--kind", default="shape", choices=["shape", "style"])
    ap.add_argument("--args", default="", help="extra key=value overrides for every run")
    ap.add_argument("--n", type=int, default=12, help="images per class and group")
    ap.add_argument("--out", default="outputs/bench_generic")
    a = ap.parse_args()

    from ace_lightning import apply_adapter, remove_adapter
    from ace_lightning.config import load_config
    from ace_lightning.models.loading import load_components
    from ace_lightning.models.sampling import SamplerSettings
    from ace_lightning.toyworld import erasure_eval as E
    from ace_lightning.toyworld.classifier import load_classifier
    from ace_lightning.train import run

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = SamplerSettings(steps=20).apply(load_components(None).pipeline())
    clf = load_classifier()
    base = E.evaluate(pipe, clf, a.kind, a.n)
    results, md = {"args": a.args, "n": a.n, "base": base, "runs": {}}, [f"args: `{a.args or '(defaults)'}`, n = {a.n}"]
    for erase in a.erase:
        names = [c.strip() for c in erase.split(",")]
        name = "+".join(names)
        t0 = time.perf_counter()
        metrics = run(load_config([f"concept={erase}", f"output_dir={out}", f"name={name}", "logger.wandb=false",
                                   "grid.enabled=false", "trainer.enable_progress_bar=false", "overwrite=true", *shlex.split(a.args)]))
        secs = time.perf_counter() - t0
        apply_adapter(pipe, out / name / "adapter.safetensors")
        after = E.evaluate(pipe, clf, a.kind, a.n)
        remove_adapter(pipe)
        summ = E.summary(after, names)
        gate = {k: v for k, v in metrics.items() if k.startswith("gate/")}
        results["runs"][name] = {"after": after, "summary": summ, "seconds": secs, "gate": gate}
        md += [f"\n### erase {name} ({secs:.0f} s)\n", E.table(base, after, names), "",
               "worst: " + ", ".join(f"{k} {v:.2f}" for k, v in summ.items()),
               "gate: " + ", ".join(f"{k} {v:.3f}" for k, v in gate.items())]
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text("\n".join(md) + "\n")
        print("\n".join(md[-5:]), flush=True)


if __name__ == "__main__":
    main()
