"""Strict configuration: dataclass schemas + ``experiments/base.yaml`` + recipes + ``key=value`` overrides.

Unknown keys are errors that list the valid keys at that level. Concept presets
(``experiments/concepts/<name>.yaml``) fill ``concepts``; ``experiment=<name>`` merges a recipe file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from ace_lightning.data.prompts import ErasureRequest
from ace_lightning.models.sampling import SamplerSettings
from ace_lightning.registry import ConfigError

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"


@dataclass
class ModelCfg:
    path: str | None = None
    dtype: str = "float32"
    device: str = "cpu"


@dataclass
class AdapterCfg:
    targets: list[str] = field(default_factory=lambda: ["to_k", "to_v"])
    rank: int = 16
    gate_q: int = 8
    gate_directions: str = "contrast"
    gate_project_out: int = 4
    gate_hard_rounds: int = 2
    gate_target: float = 0.95
    gate_fit_steps: int = 200
    gate_sibling_negatives: bool = False
    gate_neg_q: int = 0
    ungated: bool = False
    gate_carry: bool = False


@dataclass
class ClosedFormCfg:
    enabled: bool = True
    lam: float = 0.1
    s_e: float = 1.0
    s_p: float = 1.0


@dataclass
class LossCfg:
    eta: float = 1.0
    alpha_pres: float = 5.0
    alpha_gate: float = 0.1


@dataclass
class OptimCfg:
    name: str = "adamw"  # registry kind ``optimizer``: adamw, adam
    lr: float = 5e-4
    lr_gate: float = 0.0
    weight_decay: float = 0.0


@dataclass
class TrainerCfg:
    max_steps: int = 200
    steps_per_concept: int = 0
    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    log_every_n_steps: int = 10
    checkpoint_every: int = 50
    gradient_clip_val: float = 1.0
    enable_progress_bar: bool = True
    threads: int = 0


@dataclass
class DataCfg:
    batch_size: int = 4
    prompts_per_concept: int = 32
    preserve_prompts: int = 160
    latents_per_concept: int = 16
    latents_preserve: int = 160
    neighbours_k: int = 3
    neighbours_vocab: int = 4000
    neighbours_min_z: float = 3.0
    template_family: str = "sd"
    vocab_preserve: int = 50000
    vocab_heldout: int = 400
    token_policy: str = "last"
    gate_preserve_tokens: str = "all"
    gate_prompts: int = 256
    gate_hard_words: int = 64
    gate_hard_contexts: int = 32
    gate_long_prompts: int = 0
    gate_hard_pseudo: int = 0
    gate_hard_modifiers: int = 0
    gate_hard_combos: int = 0
    gate_hard_shared_contexts: bool = False
    preserve_pseudo: int = 0
    preserve_hard_words: int = 0
    gate_pseudo_pool: int = 20000
    timesteps: dict[str, Any] = field(default_factory=lambda: {"name": "uniform"})
    cache_dir: str = ".cache/ace"
    num_workers: int = 0


@dataclass
class AdvCfg:
    enabled: bool = True
    name: str = "soft_prompt"
    every: int = 25
    warmup: int = 50
    steps: int = 5
    lr: float = 1e-2
    n_adv: int = 2
    position: str = "replace"
    rows: int = 2
    pool: int = 16
    gate_refit_steps: int = 0  # > 0: after each inner attack, refit the gates with the adversarial tokens as positives
    gate_pool: int = 512  # adversarial gate positives kept per concept (the newest)


@dataclass
class AdvUnlearnCfg:
    layers: list[int] = field(default_factory=lambda: [0])  # text-encoder layers trained by advunlearn ([] = all)


@dataclass
class MaceCfg:
    rank: int = 1  # LoRA rank per concept (paper: 1)
    masks: dict[str, Any] = field(default_factory=lambda: {"name": "none"})  # mask_source of the concept's region
    lam: float = 1000.0  # fusion: pull toward the refined weights (paper: lamb 1e3)
    fuse_preserve: float = 0.0  # fusion: weight of the preserve tokens (paper: fuse_preserve_scale 0)


@dataclass
class GridCfg:
    enabled: bool = True
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    preserve_prompts: int = 3


@dataclass
class EvalCfg:
    suite: str | None = None  # run this bench suite on the adapter just trained, in the same run (bench/* metrics)
    classes: str | None = None  # quick subset: only these classes (comma-separated)
    templates: int | None = None  # ... only the first n templates
    images_per_prompt: int | None = None  # ... this many seeds per prompt
    attacks: str | None = None  # attacks on the erased prompts (bench/ASR_*)
    args: list[str] = field(default_factory=list)  # any other bench key=value (make bench's ARGS)


@dataclass
class LoggerCfg:
    wandb: bool = True
    project: str = "ace_lightning"
    mode: str = "offline"


@dataclass
class RunCfg:
    concept: str | None = ""
    kind: str = "object"
    neutral: str | None = None
    synonyms: list[str] = field(default_factory=list)
    preserve: str = ""  # phrases every ad-hoc concept keeps: names and/or @<file>, as for concept=
    method: str = "ace"
    experiment: str = ""
    concepts: list[ErasureRequest] = field(default_factory=list)  # one request's schema is the request itself
    name: str | None = None
    seed: int = 0
    output_dir: str = "outputs"
    ckpt_path: str | None = None
    overwrite: bool = False
    model: ModelCfg = field(default_factory=ModelCfg)
    adapter: AdapterCfg = field(default_factory=AdapterCfg)
    closed_form: ClosedFormCfg = field(default_factory=ClosedFormCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    trainer: TrainerCfg = field(default_factory=TrainerCfg)
    data: DataCfg = field(default_factory=DataCfg)
    adv: AdvCfg = field(default_factory=AdvCfg)
    advunlearn: AdvUnlearnCfg = field(default_factory=AdvUnlearnCfg)
    mace: MaceCfg = field(default_factory=MaceCfg)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)  # the one sampler dataclass
    grid: GridCfg = field(default_factory=GridCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    logger: LoggerCfg = field(default_factory=LoggerCfg)


def _valid_keys(cfg: DictConfig, dotted: str) -> list[str]:
    node: Any = cfg
    for part in dotted.split(".")[:-1]:
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            break
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _merge(cfg: DictConfig, other, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = getattr(e, "full_key", None) or str(e)
        raise ConfigError(f"unknown config key {key!r} in {origin}; valid keys here: {_valid_keys(cfg, str(key))}") from None
    except ValidationError as e:
        group = _group_given_a_value(cfg, other)
        if group is not None:
            keys = ", ".join(f"{group}.{k}" for k in sorted(OmegaConf.select(cfg, group).keys()))
            raise ConfigError(f"{group!r} is a group of keys, not a value ({origin}); set one of: {keys}") from None
        msg = (getattr(e, "msg", None) or str(e)).split("\n")[0]
        where = f" for {e.full_key!r}" if getattr(e, "full_key", None) else ""
        raise ConfigError(f"bad value{where} in {origin}: {msg}") from None


def _group_given_a_value(cfg: DictConfig, other, prefix: str = "") -> str | None:
    """The dotted key of ``other`` that gives a plain value where ``cfg`` has a group of keys (or None)."""
    if not isinstance(other, (dict, DictConfig)):
        return None
    for k, v in other.items():
        key = f"{prefix}{k}"
        node = OmegaConf.select(cfg, key, default=None)
        if isinstance(node, DictConfig):
            found = _group_given_a_value(cfg, v, f"{key}.") if isinstance(v, (dict, DictConfig)) else key
            if found is not None:
                return found
    return None


# What an ad-hoc concept turns into when no neutral= is given (a preset names its own).
DEFAULT_NEUTRALS = {"object": "object", "style": "art", "person": "a person", "nsfw": "a clothed person"}


def concept_names(spec: str) -> list[str]:
    """The names of ``concept=``: comma-separated, where ``@<file>`` stands for the names in that file (one a line;
    blank lines and ``#`` comments skipped), e.g. ``concept=@benchmarks/suites/lists/toy_cast_100.txt``."""
    out = []
    for item in (c.strip() for c in spec.split(",")):
        if not item.startswith("@"):
            out.append(item)
            continue
        from ace_lightning.utils import read_name_list

        path = Path(item[1:])
        names = read_name_list(path)  # ConfigError naming the file when it is missing
        if not names:
            raise ConfigError(f"concept list {path} names no concept")
        out += names
    return out


def _adhoc(cfg: DictConfig, name: str, keep: list[str]) -> DictConfig:
    kind = str(cfg.kind)
    if kind not in DEFAULT_NEUTRALS:
        raise ConfigError(f"unknown kind {kind!r} for concept {name!r}; valid: {sorted(DEFAULT_NEUTRALS)}")
    neutral = cfg.neutral if cfg.neutral else DEFAULT_NEUTRALS[kind]
    return OmegaConf.structured(ErasureRequest(concept=name, kind=kind, neutral=str(neutral),
                                               synonyms=[str(x) for x in cfg.synonyms], preserve=list(keep)))


# (key, valid?, the valid range in words): nonsense values are refused before anything is loaded
RANGES = [
    ("adapter.rank", lambda v: v >= 1, ">= 1"), ("adapter.gate_q", lambda v: v >= 1, ">= 1"),
    ("adapter.gate_hard_rounds", lambda v: v >= 0, ">= 0"), ("adapter.gate_fit_steps", lambda v: v >= 0, ">= 0"),
    ("data.gate_prompts", lambda v: v >= 0, ">= 0"), ("data.gate_hard_words", lambda v: v >= 0, ">= 0"),
    ("data.gate_hard_pseudo", lambda v: v >= 0, ">= 0"), ("data.gate_pseudo_pool", lambda v: v >= 0, ">= 0"),
    ("data.gate_hard_modifiers", lambda v: v >= 0, ">= 0"), ("data.preserve_pseudo", lambda v: v >= 0, ">= 0"),
    ("data.preserve_hard_words", lambda v: v >= 0, ">= 0"), ("data.gate_hard_combos", lambda v: v >= 0, ">= 0"),
    ("data.gate_hard_contexts", lambda v: v >= 1, ">= 1"),
    ("data.gate_long_prompts", lambda v: v >= 0, ">= 0"), ("adapter.gate_target", lambda v: 0.5 < v < 1, "in (0.5, 1)"),
    ("closed_form.lam", lambda v: v > 0, "> 0"), ("closed_form.s_e", lambda v: v >= 0, ">= 0"),
    ("closed_form.s_p", lambda v: v >= 0, ">= 0"), ("loss.eta", lambda v: v >= 0, ">= 0"),
    ("loss.alpha_pres", lambda v: v >= 0, ">= 0"), ("loss.alpha_gate", lambda v: v >= 0, ">= 0"),
    ("optim.lr", lambda v: v > 0, "> 0"), ("optim.lr_gate", lambda v: v >= 0, ">= 0"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"), ("trainer.max_steps", lambda v: v >= 0, ">= 0"),
    ("trainer.steps_per_concept", lambda v: v >= 0, ">= 0"),
    ("trainer.devices", lambda v: v >= 1, ">= 1"), ("trainer.checkpoint_every", lambda v: v >= 1, ">= 1"),
    ("trainer.threads", lambda v: v >= 0, ">= 0"), ("trainer.log_every_n_steps", lambda v: v >= 1, ">= 1"),
    ("data.batch_size", lambda v: v >= 1, ">= 1"), ("data.prompts_per_concept", lambda v: v >= 1, ">= 1"),
    ("data.preserve_prompts", lambda v: v >= 1, ">= 1"), ("data.latents_per_concept", lambda v: v >= 1, ">= 1"),
    ("data.latents_preserve", lambda v: v >= 1, ">= 1"), ("data.neighbours_k", lambda v: v >= 0, ">= 0"),
    ("data.neighbours_vocab", lambda v: v >= 0, ">= 0"), ("data.vocab_preserve", lambda v: v >= 0, ">= 0"),
    ("data.vocab_heldout", lambda v: v >= 0, ">= 0"), ("adv.every", lambda v: v >= 1, ">= 1"),
    ("adv.warmup", lambda v: v >= 0, ">= 0"), ("adv.steps", lambda v: v >= 1, ">= 1"),
    ("adv.n_adv", lambda v: v >= 1, ">= 1"), ("adv.rows", lambda v: v >= 1, ">= 1"), ("adv.pool", lambda v: v >= 1, ">= 1"),
    ("adv.gate_refit_steps", lambda v: v >= 0, ">= 0"), ("adv.gate_pool", lambda v: v >= 1, ">= 1"),
    ("adapter.gate_neg_q", lambda v: v >= 0, ">= 0"),
    ("sampler.steps", lambda v: v >= 1, ">= 1"), ("sampler.guidance", lambda v: v >= 0, ">= 0"),
]
MAX_NAME = 120  # characters of a run folder name (file systems allow 255 bytes)


def validate(cfg: DictConfig) -> None:
    """Ranges of numeric settings and the concept list; ConfigError naming the key and its valid range."""
    for key, ok, words in RANGES:
        v = OmegaConf.select(cfg, key)
        if v is not None and not ok(v):
            raise ConfigError(f"{key}={v} is out of range: must be {words}")
    from ace_lightning.method.adapter import concepts_slug, slug
    from ace_lightning.registry import lookup

    for position in str(cfg.adv.position).split(","):  # a typo fails here, not at the first attack step
        lookup("placeholder_position", position)
    lookup("optimizer", str(cfg.optim.name))  # ... and here, not after the data module's setup
    if cfg.eval.suite:
        from ace_lightning.bench.config import parse_args

        parse_args(eval_args(cfg, "adapter.safetensors", "out"))  # a bad eval key fails before training
        if cfg.trainer.devices > 1:
            raise ConfigError("eval.suite runs in the training process, on one device: with trainer.devices > 1 "
                              "run make bench on the adapter after training")
    seen: dict[str, str] = {}
    for c in cfg.concepts:
        key = slug(str(c.concept))
        if key in seen:
            raise ConfigError(f"concept {c.concept!r} is given twice (as {seen[key]!r} too)")
        seen[key] = str(c.concept)
    run_name = cfg.name or concepts_slug(list(seen.values()))
    if len(run_name) > MAX_NAME:
        raise ConfigError(f"run name of {len(run_name)} characters (> {MAX_NAME}): give a shorter name=")


def eval_args(cfg: DictConfig, adapter, out) -> list[str]:
    """The bench command line (``bench.run.main``'s argv) of ``cfg.eval`` for ``adapter``, written to ``out``; the
    base model is not rerun (the numbers of the erased model are what a sweep optimises)."""
    e = cfg.eval
    args = [f"suite={e.suite}", f"adapter={adapter}", "base=false", f"out={out}", "logger=none"]
    if cfg.model.path:
        args.append(f"model={cfg.model.path}")
    args += [f"{k}={getattr(e, k)}" for k in ("classes", "templates", "images_per_prompt", "attacks")
             if getattr(e, k) is not None]
    return args + [str(a) for a in e.args]


def scale_steps(cfg: DictConfig) -> DictConfig:
    """``trainer.steps_per_concept`` > 0 raises ``trainer.max_steps`` to that many steps per concept (in place; the
    run's config.yaml records the steps run, and a compare's reuse check compares against the same). Returns cfg."""
    t = cfg.trainer
    if t.steps_per_concept > 0:
        t.max_steps = max(t.max_steps, t.steps_per_concept * len(cfg.concepts))
    return cfg


def presets() -> list[str]:
    return sorted(p.stem for p in (EXPERIMENTS_DIR / "concepts").glob("*.yaml"))


def _yaml(path: Path, what: str) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist")
    return OmegaConf.load(path)


def load_config(overrides: list[str] | None = None, base: Path | None = None) -> DictConfig:
    """The run config: schema <- base.yaml <- method recipe (experiments/methods/<method>.yaml) <- experiment
    recipe <- overrides <- concept presets."""
    cfg = OmegaConf.structured(RunCfg)
    cfg = _merge(cfg, _yaml(base or EXPERIMENTS_DIR / "base.yaml", "base config"), "experiments/base.yaml")
    for o in overrides or []:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not key=value")
    # concept=@<file> (a concept list): "@" is reserved in YAML, so the value is taken as the string it is
    overrides = [f"""{o.split("=", 1)[0]}='{o.split("=", 1)[1].replace("'", "''")}'"""
                 if o.startswith(("concept=@", "preserve=@")) else o for o in overrides or []]
    for o in overrides:
        try:
            OmegaConf.from_dotlist([o])
        except Exception as e:  # noqa: BLE001 - omegaconf/yaml raise several types for unparsable values
            raise ConfigError(f"cannot parse the override {o!r} ({type(e).__name__}); quote values that YAML "
                              "would read as syntax") from None
    cli = OmegaConf.from_dotlist(list(overrides or []))
    recipe = cli.get("experiment") or cfg.experiment
    recipe_path = None
    if recipe:  # a name under experiments/, or a recipe file anywhere (a sweep's best.yaml)
        recipe_path = Path(recipe) if str(recipe).endswith((".yaml", ".yml")) else EXPERIMENTS_DIR / f"{recipe}.yaml"
        recipe_cfg = _yaml(recipe_path, f"experiment {recipe!r}")
    # the method: the command line's, else the recipe's (a sweep's best.yaml may name one), else the default
    method = str(cli.get("method") or (recipe_cfg.get("method") if recipe_path else None) or cfg.method)
    from ace_lightning.registry import names

    if method not in names("method"):
        raise ConfigError(f"unknown method {method!r}; valid: {names('method')}")
    path = EXPERIMENTS_DIR / "methods" / f"{method}.yaml"
    if path.is_file():  # the method's own settings, under any experiment recipe and the command line
        cfg = _merge(cfg, _yaml(path, f"method {method!r}"), str(path))
    if recipe_path:
        cfg = _merge(cfg, recipe_cfg, str(recipe_path))
    cfg = _merge(cfg, cli, "command-line overrides")
    names = concept_names(str(cfg.concept or ""))
    if str(cfg.concept or "").strip() and not any(names):
        raise ConfigError(f"no concept name in concept={cfg.concept!r}")
    if cfg.concept is not None and str(cfg.concept).strip() and any(not n for n in names):
        raise ConfigError(f"empty concept name in concept={cfg.concept!r}")
    keep = [k for k in concept_names(str(cfg.preserve or "")) if k]  # preserve=: read once, for every ad-hoc concept
    for n in [n for n in names if n]:
        path = EXPERIMENTS_DIR / "concepts" / f"{n}.yaml"
        if not (re.fullmatch(r"[\w.-]{1,100}", n) and path.is_file()):  # any phrase: an ad-hoc request
            # (kind=, neutral=, synonyms=, preserve= apply to it)
            cfg.concepts = list(cfg.concepts) + [_adhoc(cfg, n, keep)]
            continue
        pre = _yaml(path, "concept preset")
        extra = set(pre.keys()) - {"concepts"}
        if extra:
            raise ConfigError(f"concept preset {path} may only set 'concepts', found {sorted(extra)}")
        merged = _merge(OmegaConf.structured(RunCfg), pre, str(path))
        cfg.concepts = list(cfg.concepts) + list(merged.concepts)
    if not cfg.concepts:
        raise ConfigError("nothing to erase: give concept=<name>[,<name>...] (presets: " + ", ".join(presets()) + ")")
    both = sorted({c.concept for c in cfg.concepts} & {p for c in cfg.concepts for p in c.preserve})
    if both:
        raise ConfigError(f"both erased and kept (concept= and preserve=): {both}")
    validate(cfg)
    OmegaConf.set_struct(cfg, True)
    return cfg
