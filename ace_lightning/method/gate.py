"""Gate directions and calibration (spec §4)."""

from __future__ import annotations

import math
import warnings

import torch

from ace_lightning.method.closed_form import top_eigh
from ace_lightning.registry import register


def signed_energy(proj: torch.Tensor, q_neg: int = 0) -> torch.Tensor:
    """The gate score of projections ``proj`` (..., q) onto a gate's columns -> (...): the sum of their squares, less
    that of the last ``q_neg`` (a signed gate, ``adapter.gate_neg_q``). Unsigned gates pay nothing extra."""
    e = proj.pow(2)
    return e.sum(-1) if not q_neg else e[..., :-q_neg].sum(-1) - e[..., -q_neg:].sum(-1)


def _unit_cols(X: torch.Tensor) -> torch.Tensor:
    return X / X.norm(dim=0, keepdim=True).clamp_min(1e-8)


def preserve_directions(P_hat: torch.Tensor, k: int) -> torch.Tensor | None:
    """Top-k left singular vectors (d, k) of the preserve tokens as unit float64 columns P_hat (d, m)
    (:func:`unit_columns`, normalised once by the caller); computed once per run."""
    if k <= 0 or P_hat is None or not P_hat.numel():
        return None
    return torch.linalg.svd(P_hat, full_matrices=False).U[:, :k]


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


def _check_unit(P_hat: torch.Tensor) -> None:
    if P_hat.dtype != torch.float64:
        raise TypeError(f"gate directions take the preserve tokens as unit float64 columns (unit_columns), got {P_hat.dtype}")


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


def unit_scores(X_hat: torch.Tensor, Qs: list, chunk: int = 16384, q_negs: list[int] | None = None) -> torch.Tensor:
    """(m, k) float64: ``||Q_iᵀ x̂||²`` of every unit column of X_hat (d, m) (float64, :func:`unit_columns`) under
    each of k directions Q_i (d, q_i): one pass over X_hat for all of them, in column chunks (a 300k-token preserve
    set read once instead of once per concept). ``q_negs``: per gate, its last columns that count negatively
    (:func:`signed_energy`), in the same pass."""
    Qc = torch.cat([Q.double() for Q in Qs], 1)  # (d, Σq)
    seg = torch.repeat_interleave(torch.arange(len(Qs)), torch.tensor([Q.shape[1] for Q in Qs]))  # (Σq,) -> i
    sign = None
    if q_negs and any(q_negs):  # (Σq,): -1 on each gate's last q_neg columns
        sign = torch.cat([torch.cat([torch.ones(Q.shape[1] - r), -torch.ones(r)]) for Q, r in zip(Qs, q_negs)]).double()
    out = torch.zeros(X_hat.shape[1], len(Qs), dtype=torch.float64)
    for a in range(0, X_hat.shape[1], chunk):
        e = (X_hat[:, a : a + chunk].T @ Qc).pow(2)  # (c, Σq)
        out[a : a + chunk].index_add_(1, seg, e if sign is None else e * sign)
    return out


def hard_negative_whitener(P_hat: torch.Tensor, S_all: torch.Tensor, Q: torch.Tensor, frac: float, weight: float,
                           eps: float = 1e-3, s: torch.Tensor | None = None) -> torch.Tensor:
    """Whitener ``(S_all + weight · S_hard + ε)^{-1/2}`` (d, d) where ``S_hard`` is the covariance of the preserve
    tokens that score highest under the current directions ``Q`` (the top ``frac`` of P_hat (d, m), unit columns).

    Uniform whitening is dominated by the bulk of the vocabulary; the tokens a concept's gate confuses with it
    (another shape, the colour word in front of it) are a few hundred among tens of thousands. Up-weighting
    them in the metric makes the contrast directions separate the concept from its nearest neighbours.
    ``s`` (m,): the scores of P_hat under Q when already computed (:func:`unit_scores`, for many concepts at once)."""
    s = (Q.T.double() @ P_hat).pow(2).sum(0) if s is None else s  # (m,)
    k = max(16, int(frac * P_hat.shape[1]))
    H = P_hat[:, s.topk(min(k, P_hat.shape[1])).indices]  # (d, k)
    return _inv_sqrt(S_all + weight * (H @ H.T) / H.shape[1], eps)


# Gate-direction strategies: built once per run from the gate's preserve tokens P (d, m); each returns the map
# from k concepts' targets [C_i (d, n_i)] to their directions [Q_i (d, q)].
# ``P_hat``: the gate's preserve tokens as unit columns, float64 (:func:`unit_columns`), normalised once per run by
# the caller, which scores the same set (a 339k-token set is 347 MB in float64).
@register("gate_directions", "contrast")
def contrast_strategy(P_hat: torch.Tensor, q: int, project_out: int, hard_rounds: int = 0, hard_frac: float = 0.01,
                      hard_weight: float = 10.0):
    """Contrast directions in the preserve-whitened space; with ``hard_rounds`` > 0 the whitener is re-built that
    many times around the concept's hardest preserve tokens (:func:`hard_negative_whitener`)."""
    _check_unit(P_hat)
    S_all = P_hat @ P_hat.T / P_hat.shape[1]  # (d, d), shared by every concept
    Wh = _inv_sqrt(S_all, 1e-3)  # = preserve_whitener(P)

    def directions(Cs: list) -> list:  # k concepts' targets (d, n_i) -> their Q (d, q), P scored for all at once
        Qs = [contrast_directions(C, q, Wh) for C in Cs]
        for _ in range(hard_rounds):
            S = unit_scores(P_hat, Qs)  # (m, k)
            Qs = [contrast_directions(C, q, hard_negative_whitener(P_hat, S_all, Q, hard_frac, hard_weight, s=S[:, i]))
                  for i, (C, Q) in enumerate(zip(Cs, Qs))]
        return Qs

    return directions


@register("gate_directions", "svd")
def svd_strategy(P_hat: torch.Tensor, q: int, project_out: int, **_unused):
    _check_unit(P_hat)
    Up = preserve_directions(P_hat, project_out)  # shared by every concept
    return lambda Cs: [gate_directions(C, q, Up) for C in Cs]


def fit_gate(Q: torch.Tensor, gamma: float, tau: float, C: torch.Tensor, P: torch.Tensor, steps: int = 200,
             lr: float = 0.02, hard_k: int = 1024, sample_k: int = 4096, mine_every: int = 10, seed: int = 0,
             C_extra: torch.Tensor | None = None, q_neg: int = 0) -> tuple[torch.Tensor, float, float]:
    """Refine one calibrated gate against its hardest negatives; returns (Q (d, q), γ, τ) of the same gate form.

    Calibration sets τ between the targets and a *quantile* of the preserve tokens, so up to 1 % of them (on a
    CLIP-size vocabulary thousands of tokens: the nouns nearest the concept, the padding after them) stay open,
    and those are exactly the tokens whose images an erasure damages. This fits ``Q`` and the threshold with
    ``BCE(g(targets), 1) + BCE(g(hardest negatives), 0) + BCE(g(random negatives), 0)`` (each a mean), the
    hardest ``hard_k`` of all of ``P`` re-mined every ``mine_every`` steps. Measured on ToyWorld, margins on the
    logits (targets past 0.95, negatives below 0.05) helped one concept and hurt three at once; not kept. γ is folded
    into Q (``Q√γ``), so ``g = sigmoid(||Qᵀĉ||² − τ')`` with γ = 1 on return; Q is then no longer orthonormal in any
    metric.

    C (d, n): target tokens; P (d, m): negative tokens (both any norm; the gate sees unit columns). ``C_extra``
    (d, n_x): more positives with a BCE term of their own (a mean of equal weight to the targets'), so that a few
    of them (the adversarial tokens of :meth:`ErasureSystem.refit_gates`) are not drowned by thousands of targets.
    The one-gate case of :func:`fit_gates`.
    """
    if steps <= 0:
        return Q, gamma, tau
    Qs, taus = fit_gates(Q[None], [gamma], [tau], [C], P, steps=steps, lr=lr, hard_k=hard_k, sample_k=sample_k,
                         mine_every=mine_every, seed=seed, extra_pos=None if C_extra is None else [C_extra],
                         q_neg=q_neg)
    return Qs[0], 1.0, taus[0]


def _padded_unit_rows(Xs: list, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of each (d, n_i) (or None) as unit rows, zero-padded: (k, n_max, d) float32 and mask (k, n_max)."""
    n = max([0 if X is None else X.shape[1] for X in Xs] + [1])
    rows, mask = torch.zeros(len(Xs), n, d), torch.zeros(len(Xs), n, dtype=torch.bool)
    for i, X in enumerate(Xs):
        if X is not None and X.numel():
            rows[i, : X.shape[1]] = _unit_cols(X).float().T
            mask[i, : X.shape[1]] = True
    return rows, mask


def _scores_rows(X: torch.Tensor, Q: torch.Tensor, chunk: int = 16384, q_neg: int = 0) -> torch.Tensor:
    """(m, k): ``||Q_iᵀ x||²`` of every unit row x of X (m, d) under every gate Q (k, d, q), in row chunks (one
    matmul against all k gates at once: the mining pass over a 300k-token preserve set is the fit's main cost);
    signed gates less their last ``q_neg`` columns (:func:`signed_energy`)."""
    k, d, q = Q.shape
    Qf = Q.permute(1, 0, 2).reshape(d, k * q)  # (d, k q)
    return torch.cat([signed_energy((X[i : i + chunk] @ Qf).view(-1, k, q), q_neg) for i in range(0, len(X), chunk)])


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(k,) mean of x (k, n) over mask (k, n); 0 where a row has none."""
    return (x * mask).sum(1) / mask.sum(1).clamp_min(1)


def fit_gates(Q: torch.Tensor, gammas, taus, pos: list, P: torch.Tensor, neg: list | None = None, steps: int = 200,
              lr: float = 0.02, hard_k: int = 1024, sample_k: int = 4096, mine_every: int = 10, seed: int = 0,
              extra_pos: list | None = None, keep: torch.Tensor | None = None,
              q_neg: int = 0) -> tuple[torch.Tensor, list[float]]:
    """Fit k calibrated gates at once (:func:`fit_gate` per gate, batched); returns (Q (k, d, q), τ' list).

    Q (k, d, q): the gates' directions; gammas, taus: k floats; pos: k target sets (d, n_i); P (d, m): the negatives
    every gate shares; neg: k extra negative sets (d, h_i) or None, each only its own gate's (its hard negatives);
    extra_pos: k sets of further positives (d, x_i) or None (:func:`fit_gate`'s ``C_extra``). keep (d, n_keep): the
    tokens of what the user asked to keep (``preserve=``), shared by every gate, in a BCE term of their own: in
    ``P`` they are a few hundred of 300k tokens, and at 50 erased names 11 of 54 kept names still opened some gate
    to 0.9 or more (docs/SCALE.md). ``q_neg``: Q's last q_neg columns count negatively, the score a signed quadratic
    ``||Q₊ᵀĉ||² − ||Q₋ᵀĉ||²`` that can cut a neighbour out of the targets' cone; start them small, not zero (a zero
    column gets no gradient).

    Each gate's loss is its own (the three or four means of :func:`fit_gate`); the sum over gates is minimised, so
    every gate gets exactly its own gradient. Adam runs on Q_i / s_i and b_i / s'_i, which gives each gate the step
    size :func:`fit_gate` gives it (Adam is invariant to a gradient's scale). Shared work: P is normalised once, its
    hardest rows are mined for every gate in one matmul (re-mined every ``mine_every`` steps), and one random
    sample of P per step serves every gate. Gate i's hardest negatives come from P ∪ neg_i; its random ones from P.
    """
    k, d, q = Q.shape
    if steps <= 0:
        return Q, [float(t) for t in taus]
    g = torch.Generator().manual_seed(seed)
    Pt = _unit_cols(P).float().T.contiguous()  # (m, d), shared
    Ct, c_mask = _padded_unit_rows(pos, d)  # (k, n, d), (k, n)
    Ht, h_mask = _padded_unit_rows(neg if neg is not None else [None] * k, d)  # (k, h, d), (k, h)
    Xt, x_mask = _padded_unit_rows(extra_pos if extra_pos is not None else [None] * k, d)  # (k, x, d)
    has_x = x_mask.any(1).float()  # (k,): gates with a term for extra positives
    Kt = _unit_cols(keep).float().T.contiguous() if keep is not None and keep.numel() else None  # (n_keep, d)
    gam = torch.tensor([max(float(v), 1e-12) for v in gammas], dtype=torch.float64)
    Q0 = (Q.double() * gam.sqrt()[:, None, None]).float()  # (k, d, q): γ folded in
    b0 = (gam * torch.tensor([float(t) for t in taus], dtype=torch.float64)).float()  # (k,) γτ: the threshold
    q_scale = Q0.abs().mean((1, 2)).clamp_min(1e-8)  # (k,) Adam steps relative to each gate's entries
    b_scale = b0.abs().clamp_min(1.0)  # (k,)
    Z = (Q0 / q_scale[:, None, None]).clone().requires_grad_(True)
    zb = (b0 / b_scale).clone().requires_grad_(True)
    opt = torch.optim.Adam([Z, zb], lr=lr)
    m, n_hard = len(Pt), min(hard_k, len(Pt))  # every pool P ∪ neg_i has at least m real rows
    F = torch.nn.functional

    def logits(rows, Qp, b):  # rows (k, n, d) -> (k, n) gate logits
        return signed_energy(torch.bmm(rows, Qp), q_neg) - b[:, None]

    with torch.enable_grad():  # callers initialise adapters under no_grad
        for step in range(steps):
            Qp, b = Z * q_scale[:, None, None], zb * b_scale  # (k, d, q), (k,)
            if step % mine_every == 0:
                with torch.no_grad():  # ordering only: b shifts a gate's logits alike
                    s = torch.cat([_scores_rows(Pt, Qp, q_neg=q_neg).T,
                                   logits(Ht, Qp, torch.zeros(k)).masked_fill(~h_mask, -float("inf"))], 1)
                    idx = s.topk(n_hard, dim=1).indices  # (k, n_hard) into P ∪ neg_i
                    hard = torch.where((idx < m)[..., None], Pt[idx.clamp(max=m - 1)],
                                       Ht.gather(1, (idx - m).clamp(min=0)[..., None].expand(-1, -1, d)))  # (k, n_hard, d)
            rand = Pt[torch.randint(m, (min(sample_k, m),), generator=g)]  # (s, d), every gate's random negatives
            l_rand = _scores_rows(rand, Qp, chunk=len(rand), q_neg=q_neg).T - b[:, None]  # (k, s)
            loss = (_masked_mean(F.softplus(-logits(Ct, Qp, b)), c_mask) + F.softplus(logits(hard, Qp, b)).mean(1)
                    + F.softplus(l_rand).mean(1) + has_x * _masked_mean(F.softplus(-logits(Xt, Qp, b)), x_mask))
            if Kt is not None:  # (k,): every gate shut on the keep-list
                loss = loss + F.softplus(_scores_rows(Kt, Qp, chunk=len(Kt), q_neg=q_neg).T - b[:, None]).mean(1)
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
    with torch.no_grad():
        return (Z * q_scale[:, None, None]).detach().contiguous(), [float(v) for v in zb * b_scale]
