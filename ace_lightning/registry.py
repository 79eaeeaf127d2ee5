"""The one config-to-object mechanism.

Anything selectable by config (token policies, timestep samplers, losses, attacks, scorers, methods)
is registered under a ``kind`` and a ``name`` and built with :func:`build` from a mapping
``{"name": ..., **kwargs}``. Unknown names and unknown keyword arguments are errors that list the
valid ones, so a typo in a config never silently falls back to a default.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}

# Where each kind's entries are defined: imported on first use, so ``build`` works from anywhere.
PROVIDERS: dict[str, list[str]] = {
    "token_policy": ["ace_lightning.method.text"],
    "timesteps": ["ace_lightning.method.losses"],
    "inner_attack": ["ace_lightning.method.attack"],  # the training-side attack (adv.name)
    "attack": ["ace_lightning.attacks.soft_prompt", "ace_lightning.attacks.discrete",
               "ace_lightning.attacks.textual_inversion", "ace_lightning.attacks.prompt_search"],
    "placeholder_position": ["ace_lightning.method.attack"],
    "gate_directions": ["ace_lightning.method.gate"],
    "sampler": ["ace_lightning.models.sampling"],
    "model_family": ["ace_lightning.models.loading"],  # diffusers pipeline classes the package loads
    "model_alias": ["ace_lightning.toyworld.plugin"],  # model names a world provides (model.path=<name>)
    "scorer": ["ace_lightning.bench.scorers", "ace_lightning.toyworld.bench_plugin"],
    "bench_metric": ["ace_lightning.bench.metrics"],
    "class_source": ["ace_lightning.bench.suites", "ace_lightning.toyworld.bench_plugin"],
    "prompt_source": ["ace_lightning.bench.suites"],
    "world_vocabulary": ["ace_lightning.toyworld.plugin"],  # worlds name their concept words (mining excludes them)
    "method": ["ace_lightning.methods.ace", "ace_lightning.methods.esd", "ace_lightning.methods.advunlearn",
               "ace_lightning.methods.mace"],
    "mask_source": ["ace_lightning.method.masks"],
    "optimizer": ["ace_lightning.method.optim"],
    "template_family": ["ace_lightning.data.prompts", "ace_lightning.toyworld.plugin"],
}


def _load(kind: str) -> None:
    import importlib

    for mod in PROVIDERS.get(kind, []):
        importlib.import_module(mod)


class ConfigError(ValueError):
    """A configuration names something that does not exist (key, name, file)."""


def register(kind: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``obj`` as ``kind/name``; used as a decorator."""

    def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
        table = _REGISTRY.setdefault(kind, {})
        if name in table and table[name] is not obj:
            raise ConfigError(f"{kind} {name!r} is registered twice ({table[name]!r} and {obj!r})")
        table[name] = obj
        return obj

    return deco


def names(kind: str) -> list[str]:
    """The registered names of ``kind``, sorted."""
    _load(kind)
    return sorted(_REGISTRY.get(kind, {}))


def lookup(kind: str, name: str) -> Callable[..., Any]:
    _load(kind)
    table = _REGISTRY.get(kind, {})
    if name not in table:
        raise ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(names(kind)) or '(none registered)'}")
    return table[name]


def accepted_kwargs(fn: Callable[..., Any]) -> list[str] | None:
    """Keyword names ``fn`` accepts, or None when it takes ``**kwargs``."""
    sig = inspect.signature(fn)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return [
        p.name
        for p in sig.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]


def build(kind: str, cfg: Mapping[str, Any] | str, **extra: Any) -> Any:
    """Build ``kind`` from ``cfg`` (``{"name": ..., **kwargs}`` or just a name).

    ``extra`` are run-time objects (models, tokenizers) passed alongside the config values.
    """
    if isinstance(cfg, str):
        cfg = {"name": cfg}
    cfg = dict(_to_container(cfg))
    if "name" not in cfg:
        raise ConfigError(f"{kind} config needs a 'name' (one of: {', '.join(names(kind))}); got keys {sorted(cfg)}")
    fn = lookup(kind, cfg.pop("name"))
    valid = accepted_kwargs(fn)
    if valid is not None:
        bad = sorted(k for k in cfg if k not in valid)
        if bad:
            raise ConfigError(f"unknown key(s) {bad} for {kind} {fn.__name__}; valid keys: {sorted(set(valid) - set(extra))}")
    return fn(**cfg, **extra)


def _to_container(cfg: Any) -> Any:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        pass
    return cfg
