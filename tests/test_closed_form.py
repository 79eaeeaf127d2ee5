"""Closed form (spec §3): the shared-M factorisation against the direct formula and lstsq."""

import pytest
import torch

from ace_lightning.method.closed_form import (
    concept_delta,
    direct_update,
    factorize,
    preserve_factor,
    solve_concept,
    solve_concepts,
)


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("d,o,m,ns", [(12, 7, 9, [3, 5]), (20, 16, 30, [2, 4, 6]), (8, 5, 0, [7])])
def test_shared_factor_matches_direct_and_lstsq(d, o, m, ns):
    g = torch.Generator().manual_seed(d * 100 + o)
    lam, s_e, s_p = 0.3, 1.7, 0.8
    W = torch.randn(o, d, generator=g, dtype=torch.float64)
    P = torch.randn(d, m, generator=g, dtype=torch.float64) if m else None
    factor = preserve_factor(P, d, lam, s_p)  # one factorisation for every concept
    for n in ns:
        C = torch.randn(d, n, generator=g, dtype=torch.float64)
        N = torch.randn(d, n, generator=g, dtype=torch.float64)
        dW = W @ concept_delta(C, N, factor, s_e).dense()  # (o, d)
        W_direct = direct_update(W, C, N, P, lam, s_e, s_p)
        assert _rel(W + dW, W_direct) < 1e-6
        # lstsq on the stacked problem: rows are the weighted residual equations of W'ᵀ
        blocks_x = [s_e**0.5 * C.T, lam**0.5 * torch.eye(d, dtype=torch.float64)]
        blocks_y = [s_e**0.5 * (W @ N).T, lam**0.5 * W.T]
        if P is not None:
            blocks_x.append(s_p**0.5 * P.T)
            blocks_y.append(s_p**0.5 * (W @ P).T)
        X, Y = torch.cat(blocks_x), torch.cat(blocks_y)
        W_lstsq = torch.linalg.lstsq(X, Y).solution.T  # (o, d)
        assert _rel(W + dW, W_lstsq) < 1e-6


def test_rank_r_factor_reproduces_delta_when_r_ge_n():
    g = torch.Generator().manual_seed(0)
    d, n = 16, 4
    factor = preserve_factor(torch.randn(d, 10, generator=g, dtype=torch.float64), d, 0.5, 1.0)
    C, N = torch.randn(d, n, generator=g, dtype=torch.float64), torch.randn(d, n, generator=g, dtype=torch.float64)
    delta = concept_delta(C, N, factor, 2.0)
    US, Vt, s = factorize(delta, rank=n)
    assert _rel(US @ Vt, delta.dense()) < 1e-10
    US2, Vt2, _ = factorize(delta, rank=n - 2)  # truncation loses something, and is the best rank-2 approx
    err = (US2 @ Vt2 - delta.dense()).norm() ** 2
    assert abs(float(err) - float((s[n - 2 :] ** 2).sum())) < 1e-8 * float((s**2).sum())
    assert err > 1e-12


def test_solve_concept_layers_share_A():
    g = torch.Generator().manual_seed(1)
    d = 10
    weights = {"a.to_k": torch.randn(6, d, generator=g), "b.to_v": torch.randn(12, d, generator=g)}
    C, N = torch.randn(d, 3, generator=g), torch.randn(d, 3, generator=g)
    factor = preserve_factor(None, d, 1.0, 1.0)
    res = solve_concept(weights, C, N, factor, s_e=1.0, rank=8)
    assert res.A.shape == (3, d) and res.energy_kept == pytest.approx(1.0)
    for k, W in weights.items():
        ref = direct_update(W, C, N, None, 1.0, 1.0, 1.0) - W.double()
        assert _rel((res.B[k] @ res.A).double(), ref) < 1e-5  # float32 storage


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="lam"):
        preserve_factor(None, 4, 0.0, 1.0)
    f = preserve_factor(None, 4, 1.0, 1.0)
    with pytest.raises(ValueError, match="same shape"):
        concept_delta(torch.randn(4, 2), torch.randn(4, 3), f, 1.0)


def test_batched_solve_equals_one_by_one():
    g = torch.Generator().manual_seed(3)
    d = 14
    weights = {"a.to_k": torch.randn(6, d, generator=g), "b.to_v": torch.randn(9, d, generator=g)}
    factor = preserve_factor(torch.randn(d, 11, generator=g), d, 0.2, 0.7)
    pairs = [(torch.randn(d, n, generator=g), torch.randn(d, n, generator=g)) for n in (3, 5, 3, 4, 3, 3)]  # mixed n
    many = solve_concepts(weights, pairs, factor, 1.3, rank=4)
    chunked = solve_concepts(weights, pairs, factor, 1.3, rank=4, chunk=2)  # the n = 3 group in two passes
    for (C, N), res, ch in zip(pairs, many, chunked):
        one = solve_concept(weights, C, N, factor, 1.3, rank=4)
        for k in weights:  # compare the products: singular vectors are defined up to sign
            assert _rel(res.B[k] @ res.A, one.B[k] @ one.A) < 1e-5
            assert _rel(ch.B[k] @ ch.A, one.B[k] @ one.A) < 1e-5
            assert ch.B[k].is_contiguous() and ch.B[k].shape == (weights[k].shape[0], ch.A.shape[0])
        assert res.energy_kept == pytest.approx(one.energy_kept, rel=1e-9)


def test_initialize_bank_in_solve_batches_equals_one_batch(monkeypatch):
    """The bank is filled SOLVE_BATCH concepts at a time (so the results are never held whole next to it): the
    adapters come out the same as from one batch."""
    from types import SimpleNamespace

    from ace_lightning.method import initialize
    from ace_lightning.method.adapter import AdapterBank

    g = torch.Generator().manual_seed(5)
    d = 10
    weights = {"a_to_k": torch.randn(6, d, generator=g), "b_to_v": torch.randn(4, d, generator=g)}
    concepts = [SimpleNamespace(request=SimpleNamespace(concept=f"c{i}"), C=torch.randn(d, n, generator=g),
                                N=torch.randn(d, n, generator=g), gate_pos=None) for i, n in enumerate((3, 4, 3, 3, 5))]
    P = torch.randn(d, 50, generator=g)
    cf = SimpleNamespace(enabled=True, lam=0.1, s_e=1.0, s_p=1.0)
    acfg = SimpleNamespace(rank=2, gate_q=2, gate_directions="contrast", gate_project_out=0, gate_hard_rounds=0,
                           gate_target=0.95, gate_fit_steps=0, gate_carry=False, ungated=False,
                           gate_sibling_negatives=False, gate_neg_q=0)
    banks = {}
    for size in (64, 2):
        monkeypatch.setattr(initialize, "SOLVE_BATCH", size)
        banks[size] = AdapterBank(d, {k: W.shape[0] for k, W in weights.items()})
        initialize.initialize_bank(banks[size], weights, concepts, P, cf, acfg)
    for cd in concepts:
        one, two = banks[64][cd.request.concept], banks[2][cd.request.concept]
        for k in weights:
            torch.testing.assert_close(two.B[k] @ two.A, one.B[k] @ one.A)
        assert one.B["a_to_k"].abs().max() > 0
