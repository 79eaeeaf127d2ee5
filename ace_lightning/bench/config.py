"""The benchmark runner's configuration: typed key=value overrides (unknown keys are errors) and the
helpers that turn them into variants, an erased set and scorer arguments."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ace_lightning.registry import ConfigError, lookup


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
    n_erased: int | None = None  # erase the first n of the suite's classes in a fixed random order (erased_seed)
    n_retained: int | None = None  # with n_erased: generate only the next n classes of that order as retained
    erased_seed: int = 0  # the order n_erased draws from: the sets for n = 1 < 10 < 50 < 100 are nested
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
    attacks: str | None = None  # comma-separated attacks run on the erased prompts (ASR_<attack> per variant)
    attack: dict[str, Any] = field(default_factory=dict)  # attack.<name>.<key>=v: budget overrides
    attack_limit: int | None = None  # attack only the first n erased rows of each variant (default: all)
    attack_seed: int = 0  # seed of every attack's random draws


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


def csv_list(s: str | None) -> list[str] | None:
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
