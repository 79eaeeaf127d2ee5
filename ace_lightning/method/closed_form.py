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
    """``M = λI + s_p P Pᵀ`` inverted once (float64, through its Cholesky factor), so every concept's ``M⁻¹ C``
    is one GEMM (batched over concepts)."""

    inv: torch.Tensor  # (d, d) M⁻¹, symmetric

    def solve(self, X: torch.Tensor) -> torch.Tensor:
        """``M⁻¹ X`` for X (..., d, n)."""
        return self.inv @ X  # (..., d, n)


def preserve_factor(P: torch.Tensor | None, d: int, lam: float, s_p: float) -> PreserveFactor:
    """Factor ``M = λI + s_p P Pᵀ``; ``P`` is (d, m) preserve embeddings as columns (or None)."""
    if lam <= 0:
        raise ValueError(f"closed_form.lam must be > 0 (it keeps M invertible), got {lam}")
    M = lam * torch.eye(d, dtype=torch.float64)  # (d, d)
    if P is not None and P.numel():
        P = P.to(torch.float64)
        M = M + s_p * (P @ P.T)
    chol = torch.linalg.cholesky(M)
    return PreserveFactor(torch.cholesky_inverse(chol))


@dataclass
class LowRankDelta:
    """``D = left @ right`` with left (..., d, n), right (..., n, d): the exact text-space edit."""

    left: torch.Tensor  # (..., d, n) = s_e (N − C)
    right: torch.Tensor  # (..., n, d) = (I + s_e Cᵀ M⁻¹ C)⁻¹ Cᵀ M⁻¹

    def dense(self) -> torch.Tensor:
        return self.left @ self.right  # (..., d, d)


def concept_delta(C: torch.Tensor, N: torch.Tensor, factor: PreserveFactor, s_e: float) -> LowRankDelta:
    """The text-space edit ``D_k`` (kept factored) for targets C (..., d, n) and neutrals N (..., d, n);
    leading dims batch several concepts with the same n."""
    if C.shape != N.shape:
        raise ValueError(f"C and N must have the same shape, got {tuple(C.shape)} and {tuple(N.shape)}")
    C = C.to(torch.float64)
    N = N.to(torch.float64)
    n = C.shape[-1]
    MinvC = factor.solve(C)  # (..., d, n)
    K = torch.eye(n, dtype=torch.float64) + s_e * (C.mT @ MinvC)  # (..., n, n), SPD
    right = torch.linalg.solve(K, MinvC.mT)  # (..., n, d)  (Cᵀ M⁻¹ = (M⁻¹ C)ᵀ since M is symmetric)
    return LowRankDelta(left=s_e * (N - C), right=right)


def top_eigh(G: torch.Tensor, rel_tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of symmetric PSD G (..., n, n), descending, with eigenvalues below ``rel_tol·max`` zeroed."""
    lam, E = torch.linalg.eigh(G)  # ascending
    lam, E = lam.flip(-1), E.flip(-1)
    lam = torch.where(lam > rel_tol * lam[..., :1].clamp_min(1e-300), lam, torch.zeros_like(lam))
    return lam, E


def factorize(delta: LowRankDelta, rank: int, rel_tol: float = 1e-13) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``D = left @ right`` from n x n Gram matrices only (never a d x d matrix, no
    tall QR): batched over leading dims.

    With ``R Rᵀ = E Λ Eᵀ`` the rows of ``Bᵀ = Λ^{-1/2} Eᵀ R`` are orthonormal and ``D = L' Bᵀ``,
    ``L' = left E Λ^{1/2}``; with ``L'ᵀ L' = W Σ² Wᵀ``: ``U S = L' W`` and ``Vᵀ = Wᵀ Bᵀ``.
    Returns ``US`` (..., d, r), ``Vt`` (..., r, d) and the singular values (..., n) of D.
    """
    L, R = delta.left, delta.right
    lam_r, E = top_eigh(R @ R.mT, rel_tol)  # (..., n), (..., n, n)
    inv_sqrt = torch.where(lam_r > 0, lam_r.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam_r))
    Bt = (E * inv_sqrt[..., None, :]).mT @ R  # (..., n, d), orthonormal rows (or zero rows)
    Lp = L @ (E * lam_r.sqrt()[..., None, :])  # (..., d, n)
    sig2, Wv = top_eigh(Lp.mT @ Lp, rel_tol)  # (..., n)
    r = min(rank, sig2.shape[-1])
    US = Lp @ Wv[..., :r]  # (..., d, r)
    Vt = Wv[..., :r].mT @ Bt  # (..., r, d)
    return US, Vt, sig2.sqrt()


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


@dataclass
class EditedWeights:
    """Every edited projection stacked into one matrix, so ``B^l = W^l U_r S_r`` is one matmul for all l."""

    keys: list[str]
    sizes: list[int]  # o per projection
    W: torch.Tensor  # (Σo, d) float32

    @classmethod
    def stack(cls, weights: dict[str, torch.Tensor]) -> EditedWeights:
        keys = list(weights)
        return cls(keys, [weights[k].shape[0] for k in keys], torch.cat([weights[k].float() for k in keys]))

    def split(self, X: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.keys, X.split(self.sizes)))


def solve_concept(
    weights: EditedWeights | dict[str, torch.Tensor],
    C: torch.Tensor,
    N: torch.Tensor,
    factor: PreserveFactor,
    s_e: float,
    rank: int,
) -> ClosedFormResult:
    """Closed form for one concept over all edited projections (key -> W (o, d), or pre-stacked)."""
    return solve_concepts(weights, [(C, N)], factor, s_e, rank)[0]


CONCEPT_CHUNK = 64  # concepts solved per pass: bounds the float64 temporaries and B's GEMM output (SDXL: 0.7 GB)


def solve_concepts(
    weights: EditedWeights | dict[str, torch.Tensor],
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    factor: PreserveFactor,
    s_e: float,
    rank: int,
    chunk: int = CONCEPT_CHUNK,
) -> list[ClosedFormResult]:
    """:func:`solve_concept` for many concepts: concepts with the same n are batched, ``chunk`` at a time, and each
    batch's B for every layer comes from one GEMM ``W_all @ [US_1 ... US_c]``.

    Memory: the results' B (rank x Σo floats a concept: 10.6 MB on SDXL) plus one batch's temporaries. Computing
    every concept's B in one GEMM and then copying each concept's columns out held B twice: at 1000 SDXL concepts
    that was killed for memory at 24 GB."""
    if not isinstance(weights, EditedWeights):
        weights = EditedWeights.stack(weights)
    groups: dict[int, list[int]] = {}
    for i, (C, _) in enumerate(pairs):
        groups.setdefault(C.shape[1], []).append(i)
    out: list[ClosedFormResult | None] = [None] * len(pairs)
    for idx in groups.values():
        for a in range(0, len(idx), chunk):
            part = idx[a : a + chunk]
            C = torch.stack([pairs[i][0] for i in part])  # (c, d, n)
            N = torch.stack([pairs[i][1] for i in part])
            us, vt, s = factorize(concept_delta(C, N, factor, s_e), rank)  # (c, d, r), (c, r, d), (c, n)
            r = us.shape[-1]
            B_all = weights.W @ us.float().permute(1, 0, 2).reshape(us.shape[1], -1)  # (Σo, c r): every layer at once
            for j, i in enumerate(part):
                energy = float((s[j, :r] ** 2).sum() / (s[j] ** 2).sum().clamp_min(1e-300))
                B = B_all[:, j * r : (j + 1) * r].contiguous()  # (Σo, r): this concept's columns, copied once
                out[i] = ClosedFormResult(A=vt[j].float(), B=weights.split(B), singular_values=s[j], energy_kept=energy)
            del B_all
    return out
