"""Gate directions and calibration (spec §4)."""

from __future__ import annotations

import math
import warnings

import torch

from ace_lightning.method.closed_form import top_eigh
from ace_lightning.registry import register


def _unit_cols(X: torch.Tensor) -> torch.Tensor:
    return X / X.norm(dim=0, keepdim=True).clamp_min(1e-8)


def preserve_directions(P: torch.Tensor, k: int) -> torch.Tensor | None:
    """Top-k left singular vectors (d, k) of the unit preserve columns P (d, m); computed once per run."""
    if k <= 0 or P is None or not P.numel():
        return None
    return torch.linalg.svd(_unit_cols(P.double()), full_matrices=False).U[:, :k]


def _top_left_singular(X: torch.Tensor, q: int) -> torch.Tensor:
    """Top-q left singular vectors (d, q') of X (d, n), float64, from the n x n Gram matrix (n << d):
    ``U = X W Σ⁻¹``; directions with a vanishing singular value are dropped (q' <= q)."""
    sig2, W = top_eigh(X.T @ X, 1e-12)  # descending, the vanishing ones zeroed
    sig2, W = sig2[:q], W[:, :q]
    keep = sig2 > 0
    return (X @ W[:, keep]) / sig2[keep].sqrt()  # (d, q')


def gate_directions(C: torch.Tensor, q: int, Up: torch.Tensor | None = None) -> torch.Tensor:
    """Q (d, q): top-q left singular vectors of the unit target columns C (d, n), optionally after
    projecting out the preserve directions ``Up`` (d, k) (see :func:`preserve_directions`)."""
    X = _unit_cols(C.double())  # (d, n)
    if Up is not None:
        X = X - Up @ (Up.T @ X)
    return _top_left_singular(X, q).float().contiguous()  # (d, q')


def unit_columns(X: torch.Tensor) -> torch.Tensor:
    """Columns scaled to unit norm, float64 (normalise a shared P once, then score it per concept)."""
    return _unit_cols(X.double())


def _inv_sqrt(S: torch.Tensor, eps: float) -> torch.Tensor:
    """``(S + ε·tr(S)/d·I)^{-1/2}`` (d, d) for a float64 covariance S (d, d)."""
    d = S.shape[0]
    lam, E = torch.linalg.eigh(S + eps * float(torch.trace(S)) / d * torch.eye(d, dtype=torch.float64))
    return (E * lam.rsqrt()) @ E.T


def preserve_whitener(P: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """``(S_p + ε·tr(S_p)/d·I)^{-1/2}`` (d, d) for unit preserve columns; computed once per run."""
    Ph = _unit_cols(P.double())  # (d, m)
    return _inv_sqrt(Ph @ Ph.T / Ph.shape[1], eps)


def contrast_directions(C: torch.Tensor, q: int, Wh: torch.Tensor) -> torch.Tensor:
    """Q (d, q) = Wh U: the score ``||Qᵀ ĉ||² = ||Uᵀ Wh ĉ||²`` is the targets' top-q energy measured in the
    preserve-whitened space (U: top left singular vectors of the whitened unit targets), i.e. energy where
    targets have it *relative to* the preserves. Q is orthonormal in the whitened metric, not in text space."""
    U = _top_left_singular(Wh @ _unit_cols(C.double()), q)  # (d, q') of the whitened targets, orthonormal there
    return (Wh @ U).float().contiguous()


def scores(Q: torch.Tensor, X: torch.Tensor, unit: bool = False) -> torch.Tensor:
    """``||Qᵀ x̂||²`` for columns X (d, n) -> (n,); ``unit=True`` when X is already unit-norm float64."""
    Xh = X if unit else _unit_cols(X.double())
    return (Q.T.double() @ Xh).pow(2).sum(0).float()


def calibrate(s_target: torch.Tensor, s_preserve: torch.Tensor, target_q: float = 0.05, preserve_q: float = 0.99,
              target_gate: float = 0.95) -> tuple[float, float]:
    """(γ, τ) from the targets' ``target_q`` quantile ``lo`` and the preserves' ``preserve_q`` quantile ``hi``.

    τ = (lo + hi)/2. Separable (lo > hi): γ puts ``lo`` at ``target_gate``. Overlapping (lo ≤ hi): γ puts the
    overlap's ends at 1 − target_gate and target_gate (the transition band covers exactly the ambiguous
    scores), with a warning; stage 2 trains γ and τ further.
    """
    lo = float(torch.quantile(s_target.double(), target_q))
    hi = float(torch.quantile(s_preserve.double(), preserve_q)) if s_preserve.numel() else 0.0
    tau = 0.5 * (lo + hi)
    if lo <= hi:
        warnings.warn(
            f"gate: target q{target_q} ({lo:.3g}) <= preserve q{preserve_q} ({hi:.3g}); the overlap becomes the "
            "gate's transition band and stage 2 trains gamma/tau", stacklevel=2)
    # bound γ: when the quantiles (nearly) coincide the gap vanishes, γ would explode (~1e12) and the sigmoid
    # saturate so that γ and τ get no gradient in stage 2. The band's half-width is at least 10% of the scores' std.
    pooled = torch.cat([s_target.double().flatten(), s_preserve.double().flatten()])
    spread = float(pooled.std()) if pooled.numel() > 1 else 0.0
    gap = max(abs(lo - tau), 0.1 * spread, 1e-6 * max(abs(lo), abs(hi), 1.0))
    return math.log(target_gate / (1 - target_gate)) / gap, tau


# Gate-direction strategies: built once per run from the gate's preserve tokens P (d, m); each returns the
# per-concept map C (d, n) -> Q (d, q).
def hard_negative_whitener(P_hat: torch.Tensor, S_all: torch.Tensor, Q: torch.Tensor, frac: float, weight: float,
                           eps: float = 1e-3) -> torch.Tensor:
    """Whitener ``(S_all + weight · S_hard + ε)^{-1/2}`` (d, d) where ``S_hard`` is the covariance of the preserve
    tokens that score highest under the current directions ``Q`` (the top ``frac`` of P_hat (d, m), unit columns).

    Uniform whitening is dominated by the bulk of the vocabulary; the tokens a concept's gate confuses with it
    (another shape, the colour word in front of it) are a few hundred among tens of thousands. Up-weighting
    them in the metric makes the contrast directions separate the concept from its nearest neighbours."""
    s = (Q.T.double() @ P_hat).pow(2).sum(0)  # (m,)
    k = max(16, int(frac * P_hat.shape[1]))
    H = P_hat[:, s.topk(min(k, P_hat.shape[1])).indices]  # (d, k)
    return _inv_sqrt(S_all + weight * (H @ H.T) / H.shape[1], eps)


# Gate-direction strategies: built once per run from the gate's preserve tokens P (d, m); each returns the
# per-concept map C (d, n) -> Q (d, q).
@register("gate_directions", "contrast")
def contrast_strategy(P: torch.Tensor, q: int, project_out: int, hard_rounds: int = 0, hard_frac: float = 0.01,
                      hard_weight: float = 10.0):
    """Contrast directions in the preserve-whitened space; with ``hard_rounds`` > 0 the whitener is re-built that
    many times around the concept's hardest preserve tokens (:func:`hard_negative_whitener`)."""
    P_hat = _unit_cols(P.double())  # (d, m)
    S_all = P_hat @ P_hat.T / P_hat.shape[1]  # (d, d), shared by every concept
    Wh = _inv_sqrt(S_all, 1e-3)  # = preserve_whitener(P), without normalising P a second time

    def directions(C: torch.Tensor) -> torch.Tensor:
        Q = contrast_directions(C, q, Wh)
        for _ in range(hard_rounds):
            Q = contrast_directions(C, q, hard_negative_whitener(P_hat, S_all, Q, hard_frac, hard_weight))
        return Q

    return directions


@register("gate_directions", "svd")
def svd_strategy(P: torch.Tensor, q: int, project_out: int, **_unused):
    Up = preserve_directions(P, project_out)  # shared by every concept
    return lambda C: gate_directions(C, q, Up)


def fit_gate(Q: torch.Tensor, gamma: float, tau: float, C: torch.Tensor, P: torch.Tensor, steps: int = 200,
             lr: float = 0.02, hard_k: int = 1024, sample_k: int = 4096, mine_every: int = 10, seed: int = 0,
             C_extra: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float]:
    """Refine a calibrated gate against its hardest negatives; returns (Q (d, q), γ, τ) of the same gate form.

    Calibration sets τ between the targets and a *quantile* of the preserve tokens, so up to 1 % of them (on a
    CLIP-size vocabulary thousands of tokens: the nouns nearest the concept, the padding after them) stay open,
    and those are exactly the tokens whose images an erasure damages. This fits ``Q`` and the threshold with
    ``BCE(g(targets), 1) + BCE(g(hardest negatives), 0) + BCE(g(random negatives), 0)`` (each a mean), the
    hardest ``hard_k`` of all of ``P`` re-mined every ``mine_every`` steps. Measured on ToyWorld, margins on the
    logits (targets past 0.95, negatives below 0.05) helped one concept and hurt three at once; not kept. γ is folded into Q (``Q√γ``), so
    ``g = sigmoid(||Qᵀĉ||² − τ')`` with γ = 1 on return; Q is then no longer orthonormal in any metric.

    C (d, n): target tokens; P (d, m): negative tokens (both any norm; the gate sees unit columns). ``C_extra``
    (d, n_x): more positives with a BCE term of their own (a mean of equal weight to the targets'), so that a few
    of them (the adversarial tokens of :meth:`ErasureSystem.refit_gates`) are not drowned by thousands of targets.
    """
    if steps <= 0:
        return Q, gamma, tau
    g = torch.Generator().manual_seed(seed)
    def unit_rows(X):  # (d, n) columns -> (n, d) unit rows, float32
        return _unit_cols(X).float().T.contiguous()

    Ct, Pt = unit_rows(C), unit_rows(P)  # (n, d), (m, d)
    Xt = None if C_extra is None or not C_extra.numel() else unit_rows(C_extra)  # (n_x, d)
    Qp = (Q.double() * math.sqrt(max(gamma, 1e-12))).float().clone().requires_grad_(True)  # (d, q)
    b0 = float(gamma * tau)
    b = torch.tensor(b0, requires_grad=True)  # γτ: the threshold in the folded form
    scale = float(Qp.detach().abs().mean().clamp_min(1e-8))  # Adam steps relative to the entries' size
    opt = torch.optim.Adam([{"params": [Qp], "lr": lr * scale}, {"params": [b], "lr": lr * max(abs(b0), 1.0)}])
    F = torch.nn.functional
    with torch.enable_grad():  # callers initialise adapters under no_grad
        for step in range(steps):
            if step % mine_every == 0:
                with torch.no_grad():  # (m,) logits up to b, which shifts every one alike: ordering only
                    hard = (Pt @ Qp).pow(2).sum(-1).topk(min(hard_k, len(Pt))).indices
            rand = torch.randint(len(Pt), (min(sample_k, len(Pt)),), generator=g)
            l_pos = (Ct @ Qp).pow(2).sum(-1) - b  # (n,)
            l_hard = (Pt[hard] @ Qp).pow(2).sum(-1) - b  # (hard_k,)
            l_rand = (Pt[rand] @ Qp).pow(2).sum(-1) - b  # (sample_k,)
            loss = F.softplus(-l_pos).mean() + F.softplus(l_hard).mean() + F.softplus(l_rand).mean()
            if Xt is not None:
                loss = loss + F.softplus(-((Xt @ Qp).pow(2).sum(-1) - b)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return Qp.detach(), 1.0, float(b.detach())
