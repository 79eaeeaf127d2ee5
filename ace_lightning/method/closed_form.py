"""Stage 1 of ACE: the closed-form cross-attention edit (spec §3), factored into low-rank adapters.

Every edited projection ``W`` (o x d) solves
    min_W'  s_e Σ||W' c_i − W n_i||² + s_p Σ||W' p_j − W p_j||² + λ||W' − W||²_F .
All terms live in text space, so with ``M = λI + s_p P Pᵀ`` (shared by every concept and layer)
    ΔW_k = W · D_k,   D_k = s_e (N_k − C_k)(I + s_e C_kᵀ M⁻¹ C_k)⁻¹ C_kᵀ M⁻¹      (push-through identity)
One Cholesky factorisation of ``M`` serves all concepts; each concept adds an n_k x n_k solve.
``D_k = U S Vᵀ`` (rank ≤ n_k) gives ``A_k = V_rᵀ`` (shared by all layers) and ``B_k^l = W^l U_r S_r``.
All linear algebra runs in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PreserveFactor:
    """Cholesky factor of ``M = λI + s_p P Pᵀ`` (float64)."""

    chol: torch.Tensor  # (d, d) lower-triangular
    lam: float
    s_p: float

    def solve(self, X: torch.Tensor) -> torch.Tensor:
        """``M⁻¹ X`` for X (d, n)."""
        return torch.cholesky_solve(X, self.chol)  # (d, n)


def preserve_factor(P: torch.Tensor | None, d: int, lam: float, s_p: float) -> PreserveFactor:
    """Factor ``M = λI + s_p P Pᵀ``; ``P`` is (d, m) preserve embeddings as columns (or None)."""
    if lam <= 0:
        raise ValueError(f"closed_form.lam must be > 0 (it keeps M invertible), got {lam}")
    M = lam * torch.eye(d, dtype=torch.float64)  # (d, d)
    if P is not None and P.numel():
        P = P.to(torch.float64)
        M = M + s_p * (P @ P.T)
    return PreserveFactor(torch.linalg.cholesky(M), lam, s_p)


@dataclass
class LowRankDelta:
    """``D = left @ right`` with left (d, n), right (n, d): the exact text-space edit of one concept."""

    left: torch.Tensor  # (d, n) = s_e (N − C)
    right: torch.Tensor  # (n, d) = (I + s_e Cᵀ M⁻¹ C)⁻¹ Cᵀ M⁻¹

    def dense(self) -> torch.Tensor:
        return self.left @ self.right  # (d, d)


def concept_delta(C: torch.Tensor, N: torch.Tensor, factor: PreserveFactor, s_e: float) -> LowRankDelta:
    """The text-space edit ``D_k`` (kept factored) for targets C (d, n) and neutrals N (d, n)."""
    if C.shape != N.shape:
        raise ValueError(f"C and N must have the same shape, got {tuple(C.shape)} and {tuple(N.shape)}")
    C = C.to(torch.float64)
    N = N.to(torch.float64)
    n = C.shape[1]
    MinvC = factor.solve(C)  # (d, n)
    K = torch.eye(n, dtype=torch.float64) + s_e * (C.T @ MinvC)  # (n, n), SPD
    right = torch.linalg.solve(K, MinvC.T)  # (n, d)  (Cᵀ M⁻¹ = (M⁻¹ C)ᵀ since M is symmetric)
    return LowRankDelta(left=s_e * (N - C), right=right)


def factorize(delta: LowRankDelta, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``D = left @ right`` without forming the d x d matrix.

    Returns ``US`` (d, r) = U_r S_r, ``Vt`` (r, d) = V_rᵀ and the singular values (n,) of D.
    """
    Q1, R1 = torch.linalg.qr(delta.left)  # (d, n), (n, n)
    Q2, R2 = torch.linalg.qr(delta.right.T)  # (d, n), (n, n)
    u, s, vh = torch.linalg.svd(R1 @ R2.T)  # core (n, n)
    r = min(rank, s.numel())
    US = (Q1 @ u[:, :r]) * s[:r]  # (d, r)
    Vt = vh[:r] @ Q2.T  # (r, d)
    return US, Vt, s


def direct_update(
    W: torch.Tensor, C: torch.Tensor, N: torch.Tensor, P: torch.Tensor | None, lam: float, s_e: float, s_p: float
) -> torch.Tensor:
    """Reference: ``W' = W (λI + s_e N Cᵀ + s_p P Pᵀ)(λI + s_e C Cᵀ + s_p P Pᵀ)⁻¹`` (spec §3), float64."""
    W, C, N = (x.to(torch.float64) for x in (W, C, N))
    d = W.shape[1]
    I = torch.eye(d, dtype=torch.float64)
    PP = s_p * (P.to(torch.float64) @ P.to(torch.float64).T) if P is not None else 0.0
    lhs = lam * I + s_e * N @ C.T + PP  # (d, d)
    rhs = lam * I + s_e * C @ C.T + PP  # (d, d), symmetric
    return torch.linalg.solve(rhs, (W @ lhs).T).T  # (o, d) = W lhs rhs⁻¹


@dataclass
class ClosedFormResult:
    """Per-concept low-rank factors: ``ΔW^l ≈ B^l A`` for every edited projection l."""

    A: torch.Tensor  # (r, d) shared by all layers
    B: dict[str, torch.Tensor]  # layer key -> (o, r)
    singular_values: torch.Tensor  # (n,) of D_k
    energy_kept: float  # share of ||D_k||_F² kept by the rank-r truncation


def solve_concept(
    weights: dict[str, torch.Tensor],
    C: torch.Tensor,
    N: torch.Tensor,
    factor: PreserveFactor,
    s_e: float,
    rank: int,
) -> ClosedFormResult:
    """Closed form for one concept over all edited projections ``weights`` (key -> W (o, d))."""
    delta = concept_delta(C, N, factor, s_e)
    US, Vt, s = factorize(delta, rank)
    r = Vt.shape[0]
    energy = float((s[:r] ** 2).sum() / (s**2).sum().clamp_min(1e-300))
    B = {k: (W.to(torch.float64) @ US).to(torch.float32) for k, W in weights.items()}  # (o, r) each
    return ClosedFormResult(A=Vt.to(torch.float32), B=B, singular_values=s, energy_kept=energy)
