"""Stage-2 losses (spec §5) and timestep samplers; plain functions, no Lightning."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ace_lightning.registry import register


def erase_target(eps_tgt: torch.Tensor, eps_neu: torch.Tensor, eta: float) -> torch.Tensor:
    """``ε(x_t, c_neu) − η (ε(x_t, c_tgt) − ε(x_t, c_neu))`` (both frozen; (B, C, h, w)).

    η = 0 aligns the concept with the neutral prediction; η = 1 is ESD's negative guidance
    (https://arxiv.org/abs/2303.07345) around the neutral prompt.
    """
    return eps_neu - eta * (eps_tgt - eps_neu)


def erase_loss(pred: torch.Tensor, eps_tgt: torch.Tensor, eps_neu: torch.Tensor, eta: float) -> torch.Tensor:
    """``L_erase = ||ε'(x_t, c_tgt) − sg[target]||²`` (mean over elements)."""
    return F.mse_loss(pred.float(), erase_target(eps_tgt, eps_neu, eta).detach().float())


def preserve_loss(pred: torch.Tensor, eps_frozen: torch.Tensor) -> torch.Tensor:
    """``L_pres = ||ε'(x_t, c_p) − sg[ε(x_t, c_p)]||²``."""
    return F.mse_loss(pred.float(), eps_frozen.detach().float())


def gate_loss(g_target: torch.Tensor, g_preserve: torch.Tensor) -> torch.Tensor:
    """``BCE(g(target tokens), 1) + BCE(g(preserve tokens), 0)``; inputs are 1-D gate values."""
    g_target = g_target.clamp(1e-6, 1 - 1e-6)
    g_preserve = g_preserve.clamp(1e-6, 1 - 1e-6)
    return F.binary_cross_entropy(g_target, torch.ones_like(g_target)) + F.binary_cross_entropy(
        g_preserve, torch.zeros_like(g_preserve)
    )


# Timestep samplers: (batch, generator, device) -> LongTensor (B,)
@register("timesteps", "uniform")
def uniform_timesteps(low: int = 0, high: int = 1000):
    """Uniform over ``[low, high)`` (the full schedule by default)."""
    if not 0 <= low < high:
        raise ValueError(f"timesteps need 0 <= low < high, got low={low}, high={high}")

    def sample(n: int, generator: torch.Generator | None = None, num_train_timesteps: int = 1000) -> torch.Tensor:
        hi = min(high, num_train_timesteps)
        return torch.randint(low, hi, (n,), generator=generator)

    return sample


@register("timesteps", "band")
def band_timesteps(center: int = 300, width: int = 100):
    """Uniform in ``center ± width`` (MACE-style t ≈ 200–400 with the defaults)."""
    return uniform_timesteps(max(0, center - width), center + width + 1)
