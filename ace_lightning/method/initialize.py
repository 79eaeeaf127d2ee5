"""ACE's stage 1 (spec §5): one gated adapter per concept, its low-rank factors from the closed form and its gate
fitted against the preserve tokens and the concept's hard negatives. Wired into training by
``callbacks/closed_form.py``."""

from __future__ import annotations

import time

import torch

from ace_lightning.method import gate as G
from ace_lightning.method.adapter import AdapterBank
from ace_lightning.method.closed_form import EditedWeights, preserve_factor, solve_concepts
from ace_lightning.registry import build

GATE_FIT_BATCH = 16  # gates fitted at once: their own negatives (~30k tokens each) are held together while they fit
SOLVE_BATCH = 64  # concepts whose closed-form results are held at once before they are copied into the bank
SCORE_BATCH = 64  # gates scored on the preserve set at once: (m, 64) float64 scores, 170 MB for 339k tokens


def initialize_bank(bank: AdapterBank, weights: dict[str, torch.Tensor], concepts, P: torch.Tensor, cf, acfg,
                    P_gate: torch.Tensor | None = None, hard_negatives=None, fit_sets: dict | None = None,
                    hard_positives=None, keep: torch.Tensor | None = None) -> dict:
    """Fill ``bank`` with one gated adapter per concept (``concepts``: ConceptData list). Returns stats.

    ``P`` (d, m): preserve tokens of the closed form; ``P_gate``: those the gate is calibrated to stay shut on
    (default ``P``). ``cf``: closed-form settings (enabled, lam, s_e, s_p); ``acfg``: adapter settings (rank, gate_q,
    gate_project_out, gate_target, gate_fit_steps, ungated). ``hard_negatives(concept_data, score)`` -> (d, n): more
    negatives for fitting that concept's gate, chosen with its calibrated score (the DataModule's
    ``hard_negatives``); ``hard_positives(concept_data)`` -> (d, n): more positives for that fit, called after
    ``hard_negatives`` (the DataModule's ``hard_positives``), in a BCE term of their own. One factorisation of M
    serves every concept. ``fit_sets``: a dict that receives, per concept name, the (positives (d, n), negatives
    (d, m)) its gate was fitted on, for refitting it later (:meth:`ErasureSystem.refit_gates`). ``keep`` (d, n):
    tokens of the user's keep-list, which every gate's fit keeps shut in a term of their own (:func:`G.fit_gates`).
    """
    t0 = time.perf_counter()
    d = P.shape[0]
    factor = preserve_factor(P, d, cf.lam, cf.s_p) if cf.enabled else None  # one M serves every concept and layer
    stacked = EditedWeights.stack(weights) if cf.enabled else None
    solve_seconds = time.perf_counter() - t0  # the edit alone (the factor and every concept's solve); gates follow
    stats = {}
    adapters = []
    for a in range(0, len(concepts), SOLVE_BATCH):  # solved and copied into the bank a batch at a time, so that
        part = concepts[a : a + SOLVE_BATCH]  # the results are never held next to the bank whole (SDXL: 10.6 MB each)
        t = time.perf_counter()
        solved = solve_concepts(stacked, [(cd.C, cd.N) for cd in part], factor, cf.s_e, acfg.rank) if cf.enabled \
            else [None] * len(part)
        solve_seconds += time.perf_counter() - t
        for cd, res in zip(part, solved):
            if res is not None:
                A, B, energy = res.A, res.B, res.energy_kept
            else:  # LoRA-style start: A on the targets' principal directions, B = 0 (identity)
                U = torch.linalg.svd(cd.C.double(), full_matrices=False).U[:, : acfg.rank]
                A, B, energy = U.T.float(), {k: torch.zeros(W.shape[0], U.shape[1]) for k, W in weights.items()}, 0.0
            ad = bank.add_concept(cd.request.concept, rank=A.shape[0], q=acfg.gate_q)
            ad.gated = not acfg.ungated  # ungated: gate exactly 1, the plain (UCE-like) low-rank edit
            ad.carry = acfg.gate_carry
            with torch.no_grad():
                ad.A.copy_(A)
                for k in weights:
                    ad.B[k].copy_(B[k])
            stats[cd.request.concept] = {"rank": A.shape[0], "energy_kept": energy}
            adapters.append(ad)
        del solved
    P_gate = P if P_gate is None else P_gate
    P_hat = G.unit_columns(P_gate)  # (d, m'): normalised once, for the directions and every gate's scores
    directions = build("gate_directions", {"name": acfg.gate_directions, "q": acfg.gate_q,
                                           "project_out": acfg.gate_project_out, "hard_rounds": acfg.gate_hard_rounds},
                       P_hat=P_hat)  # [C_i (d, n_i)] -> [Q_i (d, q)]
    fits = []  # (concept data, adapter, positives, γ, τ) of the gates fitted below, GATE_FIT_BATCH at a time
    for a in range(0, len(concepts), SCORE_BATCH):  # directions and calibration: P_gate read once per batch
        group = list(zip(concepts[a : a + SCORE_BATCH], adapters[a : a + SCORE_BATCH]))
        with torch.no_grad():
            for (_, ad), Q in zip(group, directions([cd.C for cd, _ in group])):  # Q (d, q') each
                ad.Q = torch.zeros(d, acfg.gate_q)
                ad.Q[:, : Q.shape[1]] = Q
            S_p = G.unit_scores(P_hat, [ad.Q for _, ad in group]).float()  # (m', group): preserve scores
            for j, (cd, ad) in enumerate(group):
                s_t, s_p = G.scores(ad.Q, cd.C), S_p[:, j]
                # calibrated even when ungated (unused then: that gate is exactly 1), so a file can be re-gated
                gamma, tau = G.calibrate(s_t, s_p, target_gate=acfg.gate_target)
                stats[cd.request.concept].update({
                    "score_target_q05_q50": [float(torch.quantile(s_t.double(), q)) for q in (0.05, 0.5)],
                    "score_preserve_q50_q99": [float(torch.quantile(s_p.double(), q)) for q in (0.5, 0.99)],
                })
                if acfg.gate_fit_steps and not acfg.ungated:
                    pos = cd.C if cd.gate_pos is None else torch.cat([cd.C, cd.gate_pos], 1)  # (d, n + n_g)
                    fits.append((cd, ad, pos, gamma, tau))
                else:
                    ad.gamma.fill_(gamma)
                    ad.tau.fill_(tau)
        if acfg.ungated:
            for _, ad in group:
                ad.gamma.requires_grad_(False)
                ad.tau.requires_grad_(False)
    t_fit = time.perf_counter()
    for j in range(0, len(fits), GATE_FIT_BATCH):  # one normalisation and mining pass of P_gate per batch of gates
        batch = fits[j : j + GATE_FIT_BATCH]
        own = [None if hard_negatives is None else hard_negatives(cd, lambda X, Q=ad.Q: G.scores(Q, X.T))
               for cd, ad, *_ in batch]  # (d, n_h) each: the concept's hardest negatives, its gate's alone
        if acfg.gate_sibling_negatives:
            own = [_with_siblings(x, concepts, cd) for x, (cd, *_) in zip(own, batch)]
        extra = [None if hard_positives is None else hard_positives(cd) for cd, *_ in batch]  # (d, n_x) each
        extra = [None if x is None or not x.numel() else x for x in extra]
        Q0 = torch.stack([ad.Q for _, ad, *_ in batch])  # (k, d, q)
        r = acfg.gate_neg_q
        if r:  # the signed gate's negative columns: small, so that the fit starts from the calibrated gate
            g = torch.Generator().manual_seed(j)
            Q0 = torch.cat([Q0, 1e-3 * Q0.abs().mean() * torch.randn(*Q0.shape[:2], r, generator=g)], 2)
        Qf, taus = G.fit_gates(Q0, [f[3] for f in batch], [f[4] for f in batch], [f[2] for f in batch], P_gate, own,
                               steps=acfg.gate_fit_steps, extra_pos=extra, keep=keep, q_neg=r)
        with torch.no_grad():
            for (cd, ad, pos, *_), Q, tau, neg, x in zip(batch, Qf, taus, own, extra):
                ad.Q = Q.contiguous()
                ad.q_neg = r
                ad.gamma.fill_(1.0)
                ad.tau.fill_(tau)
                if fit_sets is not None:  # a refit sees every negative this fit saw
                    negs = [P_gate, *(t for t in (neg, keep) if t is not None)]
                    fit_sets[cd.request.concept] = (pos if x is None else torch.cat([pos, x], 1), torch.cat(negs, 1))
    fit_seconds = time.perf_counter() - t_fit
    with torch.no_grad():
        for a in range(0, len(concepts), SCORE_BATCH):  # every gate on P_gate, one pass per batch
            group = list(zip(concepts[a : a + SCORE_BATCH], adapters[a : a + SCORE_BATCH]))
            S_p = G.unit_scores(P_hat, [ad.Q for _, ad in group], q_negs=[ad.q_neg for _, ad in group]).float()  # (m', group)
            for j, (cd, ad) in enumerate(group):
                g_pres = torch.sigmoid(ad.gamma * (S_p[:, j] - ad.tau)) if ad.gated else torch.ones(1)  # (m',)
                stats[cd.request.concept].update({
                    "gamma": float(ad.gamma), "tau": float(ad.tau), "gate_target_mean": float(ad.gate(cd.C.T).mean()),
                    "gate_preserve_mean": float(g_pres.mean()), "gate_preserve_max": float(g_pres.max())})
    stats["_gate_fit_seconds"] = fit_seconds
    stats["_seconds"] = time.perf_counter() - t0
    stats["_solve_seconds"] = solve_seconds
    return stats


def sibling_targets(concepts, cd) -> torch.Tensor:
    """(d, Σ n_j) the target tokens of every other concept of the erased set (``adapter.gate_sibling_negatives``).

    At 100 erased names the gates were the limit: the retained names lost were those on which some erased name's
    gate opened (docs/SCALE.md). The generic recipe's negatives are vocabulary words and non-words, and a learned
    name is neither; the other erased names are learned names the user has given, in the same contexts. A gate fitted
    shut on them must tell its own name from its nearest learned neighbours, which is what a retained look-neighbour
    asks of it. They are erased too, so a gate that still opens on them costs nothing there. Measured at 100 names:
    the gates on the lost names halve but stay near 0.8, and no more names are kept (docs/SCALE.md, fourth round)."""
    others = [o.C for o in concepts if o is not cd]
    return torch.cat(others, 1) if others else cd.C[:, :0]


def _with_siblings(own: torch.Tensor | None, concepts, cd) -> torch.Tensor:
    sib = sibling_targets(concepts, cd).to(cd.C)
    return sib if own is None else torch.cat([own.to(sib), sib], 1)  # (d, n_h + Σ n_j)
