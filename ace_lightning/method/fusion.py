"""MACE's closed-form fusion of several per-concept edits of one projection (Lu et al. 2024, stage 3).

Concept k's own weight ``W_k`` (W plus its LoRA) maps its tokens C_k to ``Y_k = W_k C_k``. One weight for all of them:
    min_W*  Σ_k ||W* C_k − Y_k||²  +  s_p ||W* P − W P||²  +  λ ||W* − W||²_F
    W* = (Σ_k Y_k C_kᵀ + s_p W P Pᵀ + λ W) (Σ_k C_k C_kᵀ + s_p P Pᵀ + λ I)⁻¹
All linear algebra in float64.
"""

from __future__ import annotations

import torch


def fuse_projection(W: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]], lam: float,
                    P: torch.Tensor | None = None, s_p: float = 0.0) -> torch.Tensor:
    """W (o, d); ``targets``: per concept (C_k (d, n_k) tokens, Y_k (o, n_k) wanted outputs); P (d, m) preserve
    tokens. Returns W* (o, d) in W's dtype."""
    if lam <= 0:
        raise ValueError(f"the fusion's lam must be > 0 (it keeps the system invertible), got {lam}")
    W64 = W.to(torch.float64)
    d = W.shape[1]
    lhs = lam * W64  # (o, d)
    rhs = lam * torch.eye(d, dtype=torch.float64)  # (d, d)
    for C, Y in targets:
        if C.shape[0] != d or Y.shape != (W.shape[0], C.shape[1]):
            raise ValueError(f"fusion target shapes C {tuple(C.shape)}, Y {tuple(Y.shape)} do not fit W {tuple(W.shape)}")
        C, Y = C.to(torch.float64), Y.to(torch.float64)
        lhs = lhs + Y @ C.T
        rhs = rhs + C @ C.T
    if P is not None and s_p > 0:
        P = P.to(torch.float64)
        PP = s_p * (P @ P.T)  # (d, d)
        lhs = lhs + W64 @ PP
        rhs = rhs + PP
    return torch.linalg.solve(rhs, lhs.T).T.to(W.dtype)  # rhs symmetric: W* = lhs rhs⁻¹
