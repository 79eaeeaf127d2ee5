"""Gate directions and calibration (spec §4)."""

from __future__ import annotations

import math
import warnings

import torch


def _unit_cols(X: torch.Tensor) -> torch.Tensor:
    return X / X.norm(dim=0, keepdim=True).clamp_min(1e-8)


def preserve_directions(P: torch.Tensor, k: int) -> torch.Tensor | None:
    """Top-k left singular vectors (d, k) of the unit preserve columns P (d, m); computed once per run."""
    if k <= 0 or P is None or not P.numel():
        return None
    return torch.linalg.svd(_unit_cols(P.double()), full_matrices=False).U[:, :k]


def gate_directions(C: torch.Tensor, q: int, Up: torch.Tensor | None = None) -> torch.Tensor:
    """Q (d, q): top-q left singular vectors of the unit target columns C (d, n), optionally after
    projecting out the preserve directions ``Up`` (d, k) (see :func:`preserve_directions`)."""
    X = _unit_cols(C.double())  # (d, n)
    if Up is not None:
        X = X - Up @ (Up.T @ X)
    # left singular vectors from the n x n Gram matrix (n << d): U = X W Σ⁻¹
    sig2, W = torch.linalg.eigh(X.T @ X)  # ascending
    sig2, W = sig2.flip(0)[:q], W.flip(1)[:, :q]
    keep = sig2 > 1e-12 * sig2[:1].clamp_min(1e-300)
    U = (X @ W[:, keep]) / sig2[keep].sqrt()  # (d, q')
    return U.float().contiguous()


def unit_columns(X: torch.Tensor) -> torch.Tensor:
    """Columns scaled to unit norm, float64 (normalise a shared P once, then score it per concept)."""
    return _unit_cols(X.double())


def scores(Q: torch.Tensor, X: torch.Tensor, unit: bool = False) -> torch.Tensor:
    """``||Qᵀ x̂||²`` for columns X (d, n) -> (n,); ``unit=True`` when X is already unit-norm float64."""
    Xh = X if unit else _unit_cols(X.double())
    return (Q.T.double() @ Xh).pow(2).sum(0).float()


def calibrate(s_target: torch.Tensor, s_preserve: torch.Tensor, target_q: float = 0.05, preserve_q: float = 0.99,
              target_gate: float = 0.95) -> tuple[float, float]:
    """(γ, τ): τ midway between the targets' ``target_q`` and the preserves' ``preserve_q`` quantiles,
    γ so that a target at that quantile gates at ``target_gate``."""
    lo = float(torch.quantile(s_target.double(), target_q))
    hi = float(torch.quantile(s_preserve.double(), preserve_q)) if s_preserve.numel() else 0.0
    tau = 0.5 * (lo + hi)
    gap = lo - tau
    if gap < 1e-3:
        warnings.warn(
            f"gate cannot separate targets from preserves (target q{target_q}={lo:.3f} <= preserve q{preserve_q}={hi:.3f});"
            " stage 2 will train gamma/tau", stacklevel=2)
        gap = 1e-2
    return math.log(target_gate / (1 - target_gate)) / gap, tau
