"""Optimizers (registry kind ``optimizer``), chosen by ``optim.name``: every method's system gets its optimizer
from here instead of naming a torch class. ``lr`` is the default of every parameter group; a group may set its own
(ACE's gate group uses ``optim.lr_gate``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ace_lightning.registry import build, register


@register("optimizer", "adamw")
def adamw(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@register("optimizer", "adam")
def adam(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The ESD / AdvUnlearn papers' choice (weight decay added to the gradient, not decoupled)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def optimizer_factory(optim_cfg) -> Callable[[list], torch.optim.Optimizer]:
    """``optim`` config section -> ``params -> optimizer`` (a list of tensors or of parameter-group dicts)."""
    spec = {"name": optim_cfg.name, "lr": float(optim_cfg.lr), "weight_decay": float(optim_cfg.weight_decay)}
    return lambda params: build("optimizer", spec, params=params)
