"""Run a benchmark suite: ``python -m ace_lightning.bench.run suite=<name> [devices=N] [adapter=a,b] [k=v ...]``.

config -> suite rows -> Trainer -> predict (generate missing PNGs) -> test (score all PNGs) -> reports.
With devices > 1 Lightning's DDP launcher re-runs this module once per rank (gloo on CPU).
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ace_lightning.bench.config import (
    BenchConfig,
    adapter_concepts,
    adapter_variants,
    csv_list,
    parse_args,
    route_overrides,
)
from ace_lightning.registry import ConfigError, build
from ace_lightning.utils import set_threads

__all__ = ["BenchConfig", "main", "parse_args", "route_overrides"]


@dataclass
class Plan:
    """What one bench run does: the variants (name -> adapter path or None for the base model), the prompt rows of
    every variant, the rows whose image is still missing, and where everything goes."""

    out: Path
    run: str
    model: str | None
    sampler: dict
    sel: Any  # suites.Selection
    variants: dict[str, str | None]
    rows: list = field(default_factory=list)
    todo: list = field(default_factory=list)
    batch_size: int = 1
    model_digest: str = ""  # models.loading.weights_digest of the model: what the image folders pin


def plan_run(cfg: BenchConfig, suite) -> Plan:
    """Variants, the erased set (explicit ``erased=``, else the adapters' concepts found in the suite, else the
    suite's), the rows and the missing images (existing PNGs are kept: a rerun resumes)."""
    from ace_lightning.bench import generation as G
    from ace_lightning.bench.suites import Selection

    variants = ({"base": None} if cfg.base else {}) | adapter_variants(csv_list(cfg.adapter) or [])
    if not variants:
        raise ConfigError("nothing to run: base=false and no adapter=")
    erased, classes = csv_list(cfg.erased), csv_list(cfg.classes)

    def in_suite() -> list[str]:  # the adapters' concepts that are classes of the suite (reads their metadata)
        return [c for a in variants.values() if a for c in adapter_concepts(a) if c in suite.classes.names]

    if cfg.n_erased is not None:
        if erased is not None or classes is not None or suite.classes is None:
            raise ConfigError("n_erased= needs a suite with classes, and no erased= or classes=")
        from ace_lightning.bench.suites import draw_erased

        erased, kept = draw_erased(suite.classes.names, cfg.n_erased, cfg.erased_seed, cfg.n_retained)
        classes = erased + kept if cfg.n_retained is not None else None
        trained = set(in_suite())
        if trained and trained != set(erased):
            from ace_lightning.utils import say

            say(f"warning: n_erased={cfg.n_erased} (erased_seed={cfg.erased_seed}) draws {len(erased)} classes, but "
                f"the adapters erase {len(trained)} of the suite's, {len(trained & set(erased))} of them drawn: the "
                "erased group is not what they were trained on")
    elif cfg.n_retained is not None:
        raise ConfigError("n_retained= goes with n_erased=")
    if erased is None and suite.classes is not None:
        erased = list(dict.fromkeys(in_suite())) or None
    overrides = {k: getattr(cfg, k) for k in ("steps", "guidance", "scheduler") if getattr(cfg, k) is not None}
    sel = Selection(erased=suite.prompts.resolve_erased(erased), classes=classes, templates=cfg.templates,
                    limit=cfg.limit, csv=cfg.csv, seed=suite.seed if cfg.seed is None else cfg.seed,
                    images_per_prompt=cfg.images_per_prompt or suite.images_per_prompt)
    run = cfg.run or "+".join(variants)
    plan = Plan(out=Path(cfg.out or Path("outputs") / "bench" / suite.name / run), run=run,
                model=cfg.model or suite.model, sampler={**suite.sampler, **overrides}, sel=sel, variants=variants,
                batch_size=cfg.batch_size or suite.batch_size)
    base_rows = suite.rows(sel)
    plan.rows = [G.PromptRow(**{**r.as_dict(), "variant": v}) for v in variants for r in base_rows]
    from ace_lightning.models.loading import resolve_model_dir, weights_digest

    plan.model_digest = weights_digest(resolve_model_dir(plan.model))
    G.check_generation_settings(plan.out, variants, {"model": plan.model or "ToyWorld", "model_digest": plan.model_digest,
                                                     "dtype": cfg.dtype, "sampler": plan.sampler}, recorded_only=("model",))
    plan.todo = [r for r in plan.rows if not G.image_path(plan.out, r).is_file()]
    return plan


def build_scoring(suite, cfg: BenchConfig):
    """The suite's metric sets with ``cfg``'s overrides -> (metrics, scorers, scorer key per config, specs). Scorers
    are shared between metric sets with the same scorer config; a spec is (tag, scorer key, metric factory)."""
    metrics = route_overrides(suite.metrics, cfg)
    scorer_cfgs = {json.dumps(m["scorer"], sort_keys=True): m["scorer"] for m in metrics}
    scorers = {f"s{i}": build("scorer", c) for i, c in enumerate(scorer_cfgs.values())}
    for s in scorers.values():
        s.setup(suite.classes)
    skey = {k: f"s{i}" for i, k in enumerate(scorer_cfgs)}
    specs = [(tag, skey[json.dumps(m["scorer"], sort_keys=True)], make)
             for m, (tag, make) in zip(metrics, metric_factories(metrics))]
    return metrics, scorers, skey, specs


def metric_factories(metrics: list[dict]) -> list[tuple[str, Any]]:
    """(tag, () -> a fresh metric set) per metric-set config (its scorer is not built)."""
    out = []
    for m in metrics:
        mcfg = {k: v for k, v in m.items() if k not in ("scorer", "tag")}
        out.append((m.get("tag", ""), lambda c=mcfg: build("bench_metric", c)))
    return out


def _pipe_factory(plan: Plan, dtype: str):
    """device -> the stock pipeline of ``plan.model`` with the plan's sampler (built on each rank)."""

    def make(device):
        from ace_lightning.models.loading import load_components
        from ace_lightning.models.sampling import SamplerSettings

        pipe = load_components(plan.model, dtype=dtype, device=str(device)).pipeline()
        keep = ("scheduler", "steps", "guidance", "eta")
        return SamplerSettings(**{k: plan.sampler[k] for k in keep if k in plan.sampler}).apply(pipe)

    return make


def main(argv: list[str] | None = None) -> dict[str, float]:
    import lightning as L

    from ace_lightning.bench import generation as G
    from ace_lightning.bench.suites import load_suite
    from ace_lightning.utils import quiet_known_notices

    quiet_known_notices()
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    # our writer never needs Lightning's batch indices (rows carry their own identity)
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
    suite = load_suite(cfg.suite)
    set_threads(cfg.threads, cfg.devices)
    plan = plan_run(cfg, suite)
    _check_up_front(plan.out, plan.model, cfg.dtype, [a for a in plan.variants.values() if a])
    metrics, scorers, skey, specs = build_scoring(suite, cfg)

    plan.out.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, strategy="ddp" if cfg.devices > 1 else "auto",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[G.ImageWriter(plan.out)],
                        inference_mode=not cfg.attacks)  # white-box attacks need gradients in predict
    t0 = time.perf_counter()
    if plan.todo:
        trainer.predict(G.GenerationSystem(_pipe_factory(plan, cfg.dtype), plan.variants, plan.sampler,
                                           G.make_batches(plan.todo, plan.batch_size)), return_predictions=False)
    gen_wall = time.perf_counter() - t0
    trainer.strategy.barrier()  # every rank's PNGs exist before anyone scores
    scoring = G.ScoringSystem(plan.out, scorers, specs, list(plan.variants), G.make_batches(plan.rows, plan.batch_size))
    trainer.test(scoring, verbose=False)
    results = scoring.compute_results()  # all ranks: all-reduce
    attack_settings = {}
    if cfg.attacks:
        from ace_lightning.bench.attacks import run_attacks

        attack_settings = run_attacks(cfg, suite, plan, trainer, scorers, specs, results, _pipe_factory(plan, cfg.dtype))
    if trainer.global_rank != 0:
        return {}
    settings = _settings(cfg, suite, plan, metrics, scorers, skey) | attack_settings
    return _write_reports(cfg, suite, plan, results, settings, gen_wall)


def _write_reports(cfg: BenchConfig, suite, plan: Plan, results: dict, settings: dict, gen_wall: float) -> dict:
    """Rank 0, after scoring: merged score rows, timing, metrics.json/.md, the grid, the bar chart, wandb."""
    from ace_lightning.bench import report

    out = plan.out
    _merge_rank_files(out, "scores")
    if any(out.glob("attack_scores.rank*.jsonl")):
        _merge_rank_files(out, "attack_scores")
    for p in out.glob("attack_rows_timing.rank*.json"):
        p.unlink()
    timing = {"generated": len(plan.todo), "skipped_existing": len(plan.rows) - len(plan.todo),
              "wall_seconds": gen_wall, "ranks": []}
    for p in sorted(out.glob("timing.rank*.json")):
        timing["ranks"].append(json.loads(p.read_text()))
        p.unlink()
    if plan.todo and timing["ranks"]:
        timing["images_per_second"] = len(plan.todo) / max(r["seconds"] for r in timing["ranks"])
    report.write_metrics_json(out, results, settings, timing)
    report.write_markdown(out, results, settings)
    grid = report.image_grid(out, plan.rows, list(plan.variants), cfg.grid or suite.grid.get("prompts", 4))
    report.bar_chart(out, results)
    primary = list(plan.variants)[-1]
    _log_wandb(cfg, out, plan.run, suite.name, results, primary, grid)
    print(report.markdown_table(results, settings))
    print(f"reports in {out}")
    return results[primary]


def _merge_rank_files(out: Path, stem: str) -> None:
    """``<stem>.rank*.jsonl`` -> one ``<stem>.jsonl`` (rows sorted), written atomically."""
    from ace_lightning.utils import atomic_write_text

    parts = sorted(out.glob(f"{stem}.rank*.jsonl"))
    lines = sorted(ln for p in parts for ln in p.read_text().splitlines() if ln.strip())
    atomic_write_text(out / f"{stem}.jsonl", "".join(ln + "\n" for ln in lines))
    for p in parts:
        p.unlink()


def _settings(cfg, suite, plan: Plan, metrics, scorers, skey) -> dict:
    import diffusers
    import open_clip
    import torchmetrics

    import ace_lightning
    from ace_lightning.utils import file_digest

    sel, variants = plan.sel, plan.variants
    by_key = {v: k for k, v in skey.items()}
    return {
        "suite": suite.name, "suite_file": suite.path, "run": plan.run, "model": plan.model or "ToyWorld",
        "model_digest": plan.model_digest, "dtype": cfg.dtype, "variants": variants, "adapter_sha256": {v: file_digest(a) for v, a in variants.items() if a},
        "sampler": plan.sampler, "images_per_prompt": sel.images_per_prompt, "seed": sel.seed,
        "seeds": f"{sel.seed}..{sel.seed + sel.images_per_prompt - 1} per prompt (csv seed_column overrides)",
        "erased": sel.erased, "classes": sel.classes, "templates": sel.templates, "limit": sel.limit, "csv": sel.csv,
        "prompts": suite.prompts_cfg, "devices": cfg.devices, "batch_size": plan.batch_size,
        "metrics": [{k: v for k, v in m.items() if k != "scorer"} | {"scorer": m["scorer"]} for m in metrics],
        "scorers": {k: scorers[k].info() for k in scorers},
        "scorer_configs": {k: json.loads(by_key[k]) for k in scorers},
        "versions": {"ace_lightning": ace_lightning.__version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "open_clip": open_clip.__version__,
                     "torchmetrics": torchmetrics.__version__},
    }


def _log_wandb(cfg, out, run, suite, results, primary, grid) -> None:
    if cfg.logger == "none":
        return
    if cfg.logger != "wandb":
        raise ConfigError(f"logger must be wandb or none, got {cfg.logger!r}")
    import wandb

    from ace_lightning.utils import open_wandb_run

    os.environ.setdefault("WANDB_MODE", "offline")
    wrun = open_wandb_run("ace_lightning-bench", f"{suite}-{run}", out, stepped=False)
    if wrun is None:
        return
    flat = dict(results[primary])  # the primary variant under bench/<name>; others under bench_<variant>/<name>
    for v, r in results.items():
        if v != primary:
            flat |= {k.replace("bench/", f"bench_{v}/", 1): x for k, x in r.items()}
    if grid is not None:
        flat["bench/grid"] = wandb.Image(str(grid))
    wrun.log(flat)
    wrun.finish()


def _check_up_front(out: Path, model, dtype: str, adapters: list[str]) -> None:
    """Fail before generating anything: the output folder must be writable and every adapter must have been made
    for this model (one UNet load; generation would otherwise find out after all base images)."""
    from ace_lightning.utils import check_writable

    check_writable(out, "out")
    if adapters:
        from ace_lightning.export import check_compatible
        from ace_lightning.models.loading import load_components

        unet = load_components(model, dtype=dtype).unet
        for a in adapters:
            check_compatible(unet, a)


def cli() -> None:
    from ace_lightning.utils import run_cli

    run_cli(main)


if __name__ == "__main__":
    cli()
