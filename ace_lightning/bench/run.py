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
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ace_lightning.registry import ConfigError, build, lookup


@dataclass
class BenchConfig:
    suite: str = ""  # suite name (benchmarks/suites/<name>.yaml) or a .yaml path
    devices: int = 1  # processes (DDP when > 1; gloo on CPU)
    accelerator: str = "auto"  # auto | cpu | gpu
    dtype: str = "float32"  # generation dtype: float32 | float16 | bfloat16 (half precision on GPU only)
    model: str | None = None  # diffusers dir or cached hub id; None = the suite's model, else ToyWorld
    adapter: str | None = None  # comma-separated adapter files; each is one variant next to the base model
    base: bool = True  # also run the base model (the "before" numbers and grid column)
    out: str | None = None  # output folder (default outputs/bench/<suite>/<run>)
    run: str | None = None  # run name (default: the variant names joined by '+')
    erased: str | None = None  # comma-separated erased classes (default: adapters' concepts, else the suite's)
    classes: str | None = None  # generate only these classes (zero-shot stays over the suite's full list)
    templates: int | None = None  # use only the first n templates
    limit: int | None = None  # csv suites: only the first n prompts
    csv: str | None = None  # csv suites: the prompt CSV (I2P, COCO captions)
    images_per_prompt: int | None = None  # default: the suite's
    seed: int | None = None  # first seed (default: the suite's)
    steps: int | None = None  # denoising steps (default: the suite's)
    guidance: float | None = None  # CFG scale (default: the suite's)
    scheduler: str | None = None  # registered sampler (default: the suite's)
    batch_size: int | None = None  # default: the suite's
    pretrained: str | None = None  # open_clip checkpoint file for clip_* scorers
    clip_model: str | None = None  # open_clip architecture for clip_* scorers
    threshold: float | None = None  # NudeNet score threshold (default 0.6)
    resnet_weights: str | None = None  # torchvision ResNet-50 state-dict file
    fid_weights: str | None = None  # torch-fidelity Inception weights file
    antialias: bool | None = None  # FID resize antialiasing (torchmetrics default True)
    grid: int | None = None  # prompts in the base-vs-erased grid (default: the suite's)
    threads: int | None = None  # torch threads per process (default: cores // devices)
    logger: str = "wandb"  # wandb (offline unless WANDB_MODE=online) | none


# run key -> (where, key in the scorer's / metric set's constructor); applied where the constructor takes it
ROUTED = {"pretrained": ("scorer", "pretrained"), "clip_model": ("scorer", "model"), "threshold": ("scorer", "threshold"),
          "resnet_weights": ("scorer", "weights"), "fid_weights": ("bench_metric", "weights"),
          "antialias": ("bench_metric", "antialias")}


def parse_args(argv: list[str]) -> BenchConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, ValidationError

    valid = [f.name for f in fields(BenchConfig)]
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(f"arguments must be key=value; got {bad}; valid keys: {valid}")
    schema = OmegaConf.structured(BenchConfig)
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.from_dotlist(argv))
    except (ConfigKeyError, ValidationError) as e:
        raise ConfigError(f"{e.msg if hasattr(e, 'msg') else e}; valid keys: {valid}") from None
    cfg = BenchConfig(**OmegaConf.to_container(cfg))
    if not cfg.suite:
        from ace_lightning.bench.suites import suite_names

        raise ConfigError(f"suite=<name> is required; suites: {', '.join(suite_names())}")
    return cfg


def _csv(s: str | None) -> list[str] | None:
    return [x.strip() for x in str(s).split(",") if x.strip()] if s else None


def adapter_variants(adapters: list[str]) -> dict[str, str]:
    """Variant name per adapter file: its stem, or its folder's name for a generic 'adapter.safetensors'."""
    out: dict[str, str] = {}
    for a in adapters:
        p = Path(a)
        if not p.is_file():
            raise ConfigError(f"adapter file {p} not found")
        name = p.parent.name if p.stem in ("adapter", "model") else p.stem
        while name in out or name == "base":
            name += "_"
        out[name] = str(p)
    return out


def adapter_concepts(path: str) -> list[str]:
    """The concept names stored in an adapter file's metadata."""
    from ace_lightning.export import read_adapter

    return [c["concept"] for c in read_adapter(path)[1]["concepts"]]


def _named_params(fn) -> list[str]:
    """Named constructor arguments (ignoring **kwargs, which torchmetrics' Metric options go through)."""
    import inspect

    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def route_overrides(metrics: list[dict], cfg: BenchConfig) -> list[dict]:
    """Put run keys (pretrained=, threshold=, ...) into every scorer / metric set whose constructor takes them."""
    out = []
    for m in metrics:
        m = {**m, "scorer": dict(m["scorer"])}
        for key, (kind, arg) in ROUTED.items():
            val = getattr(cfg, key)
            if val is None:
                continue
            target = m["scorer"] if kind == "scorer" else m
            if arg in _named_params(lookup(kind, target["name"])):
                target[arg] = val
        out.append(m)
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    import lightning as L

    from ace_lightning.bench import generation as G
    from ace_lightning.bench import report
    from ace_lightning.bench.suites import Selection, load_suite

    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    # our writer never needs Lightning's batch indices (rows carry their own identity)
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
    suite = load_suite(cfg.suite)
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // cfg.devices))

    # variants and the erased set: explicit erased=, else the adapters' concepts found in the suite, else the suite's
    variants = ({"base": None} if cfg.base else {}) | adapter_variants(_csv(cfg.adapter) or [])
    if not variants:
        raise ConfigError("nothing to run: base=false and no adapter=")
    erased = _csv(cfg.erased)
    if erased is None and suite.classes is not None:
        found = [c for a in variants.values() if a for c in adapter_concepts(a) if c in suite.classes.names]
        erased = list(dict.fromkeys(found)) or None
    sampler = {**suite.sampler, **{k: getattr(cfg, k) for k in ("steps", "guidance", "scheduler") if getattr(cfg, k) is not None}}
    sel = Selection(erased=suite.prompts.resolve_erased(erased), classes=_csv(cfg.classes), templates=cfg.templates,
                    limit=cfg.limit, csv=cfg.csv, seed=suite.seed if cfg.seed is None else cfg.seed,
                    images_per_prompt=cfg.images_per_prompt or suite.images_per_prompt)
    base_rows = suite.rows(sel)
    rows = [G.PromptRow(**{**r.as_dict(), "variant": v}) for v in variants for r in base_rows]
    run = cfg.run or "+".join(variants)
    out = Path(cfg.out or Path("outputs") / "bench" / suite.name / run)
    bs = cfg.batch_size or suite.batch_size
    todo = [r for r in rows if not G.image_path(out, r).is_file()]  # resume: existing PNGs are kept

    model = cfg.model or suite.model

    def pipe_factory(device):
        from ace_lightning.models.loading import load_components
        from ace_lightning.models.sampling import SamplerSettings

        pipe = load_components(model, dtype=cfg.dtype, device=str(device)).pipeline()
        return SamplerSettings(**{k: sampler[k] for k in ("scheduler", "steps", "guidance", "eta") if k in sampler}).apply(pipe)

    # scorers are shared between metric sets with the same scorer config
    metrics = route_overrides(suite.metrics, cfg)
    scorer_cfgs = {json.dumps(m["scorer"], sort_keys=True): m["scorer"] for m in metrics}
    scorers = {f"s{i}": build("scorer", c) for i, c in enumerate(scorer_cfgs.values())}
    for s in scorers.values():
        s.setup(suite.classes)
    skey = {k: f"s{i}" for i, k in enumerate(scorer_cfgs)}
    specs = []
    for m in metrics:
        mcfg = {k: v for k, v in m.items() if k not in ("scorer", "tag")}
        specs.append((m.get("tag", ""), skey[json.dumps(m["scorer"], sort_keys=True)], lambda c=mcfg: build("bench_metric", c)))

    out.mkdir(parents=True, exist_ok=True)
    writer = G.ImageWriter(out)
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, strategy="ddp" if cfg.devices > 1 else "auto",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[writer])
    t0 = time.perf_counter()
    if todo:
        trainer.predict(G.GenerationSystem(pipe_factory, variants, sampler, G.make_batches(todo, bs)),
                        return_predictions=False)
    gen_wall = time.perf_counter() - t0
    trainer.strategy.barrier()  # every rank's PNGs exist before anyone scores
    scoring = G.ScoringSystem(out, scorers, specs, list(variants), G.make_batches(rows, bs))
    trainer.test(scoring, verbose=False)
    results = scoring.compute_results()  # all ranks: all-reduce
    if trainer.global_rank != 0:
        return {}

    timing = {"generated": len(todo), "skipped_existing": len(rows) - len(todo), "wall_seconds": gen_wall, "ranks": []}
    for p in sorted(out.glob("timing.rank*.json")):
        timing["ranks"].append(json.loads(p.read_text()))
        p.unlink()
    if todo and timing["ranks"]:
        timing["images_per_second"] = len(todo) / max(r["seconds"] for r in timing["ranks"])
    settings = _settings(cfg, suite, sampler, sel, variants, run, metrics, scorers, skey, model)
    report.write_metrics_json(out, results, settings, timing)
    (out / "metrics.md").write_text(report.markdown_table(results, settings))
    grid = report.image_grid(out, rows, list(variants), cfg.grid or suite.grid.get("prompts", 4))
    report.bar_chart(out, results)
    primary = list(variants)[-1]
    _log_wandb(cfg, out, run, suite.name, results, primary, grid)
    print(report.markdown_table(results, settings))
    print(f"reports in {out}")
    return results[primary]


def _settings(cfg, suite, sampler, sel, variants, run, metrics, scorers, skey, model) -> dict:
    import diffusers
    import open_clip
    import torchmetrics

    import ace_lightning

    by_key = {v: k for k, v in skey.items()}
    return {
        "suite": suite.name, "suite_file": suite.path, "run": run, "model": model or "ToyWorld", "dtype": cfg.dtype,
        "variants": variants, "sampler": sampler, "images_per_prompt": sel.images_per_prompt, "seed": sel.seed,
        "seeds": f"{sel.seed}..{sel.seed + sel.images_per_prompt - 1} per prompt (csv seed_column overrides)",
        "erased": sel.erased, "classes": sel.classes, "templates": sel.templates, "limit": sel.limit, "csv": sel.csv,
        "prompts": suite.prompts_cfg, "devices": cfg.devices, "batch_size": cfg.batch_size or suite.batch_size,
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
    from lightning.pytorch.loggers import WandbLogger

    offline = os.environ.get("WANDB_MODE", "offline") != "online"
    logger = WandbLogger(project="ace_lightning-bench", name=f"{suite}-{run}", save_dir=str(out), offline=offline)
    flat = dict(results[primary])  # the primary variant under bench/<name>; others under bench_<variant>/<name>
    for v, r in results.items():
        if v != primary:
            flat |= {k.replace("bench/", f"bench_{v}/", 1): x for k, x in r.items()}
    logger.log_metrics(flat)
    if grid is not None:
        logger.log_image("bench/grid", [str(grid)])
    logger.experiment.finish()


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        sys.exit(f"error: {e}")
