"""Gate directions and calibration (spec §4, with the project's 'contrast' directions)."""

import math

import pytest
import torch

from ace_lightning.method import gate as G


def _data(seed=0, d=32):
    """Targets and preserves that share a dominant direction (like EOS tokens) and a high-variance one;
    only a weak, consistent direction tells the targets apart."""
    g = torch.Generator().manual_seed(seed)
    common, concept, u = (torch.randn(d, 1, generator=g) for _ in range(3))
    C = 5 * common + 0.5 * concept + 2 * u * torch.randn(1, 60, generator=g) + 0.6 * torch.randn(d, 60, generator=g)
    P = 5 * common + 2 * u * torch.randn(1, 200, generator=g) + 0.6 * torch.randn(d, 200, generator=g)
    return C, P


def _auc(s_t, s_p):
    return float((s_t[:, None] > s_p[None, :]).float().mean())


def test_contrast_separates_what_plain_svd_cannot():
    C, P = _data()
    q_svd = G.gate_directions(C, 2)  # dominated by the shared direction
    q_con = G.contrast_directions(C, 2, G.preserve_whitener(P))
    auc_svd = _auc(G.scores(q_svd, C), G.scores(q_svd, P))
    auc_con = _auc(G.scores(q_con, C), G.scores(q_con, P))
    assert auc_con > 0.99 and auc_svd < 0.95, (auc_svd, auc_con)  # measured: svd 0.915, contrast 0.9996
    assert torch.allclose(q_svd.T @ q_svd, torch.eye(q_svd.shape[1]), atol=1e-5)  # svd: orthonormal


def test_calibrate_separable_and_overlapping():
    s_t = torch.linspace(0.6, 1.0, 101)
    s_p = torch.linspace(0.0, 0.3, 101)
    gamma, tau = G.calibrate(s_t, s_p)
    lo, hi = float(torch.quantile(s_t, 0.05)), float(torch.quantile(s_p, 0.99))
    assert tau == pytest.approx((lo + hi) / 2)
    assert 1 / (1 + math.exp(-gamma * (lo - tau))) == pytest.approx(0.95, abs=1e-6)
    # overlap: the ambiguous band [lo, hi] maps onto [0.05, 0.95]
    s_p2 = torch.linspace(0.0, 0.8, 101)
    with pytest.warns(UserWarning, match="transition band"):
        gamma, tau = G.calibrate(s_t, s_p2)
    lo, hi = float(torch.quantile(s_t, 0.05)), float(torch.quantile(s_p2, 0.99))
    assert 1 / (1 + math.exp(-gamma * (hi - tau))) == pytest.approx(0.95, abs=1e-6)
    assert 1 / (1 + math.exp(-gamma * (lo - tau))) == pytest.approx(0.05, abs=1e-6)


def test_calibrate_bounds_gamma_when_quantiles_coincide():
    """Coinciding quantiles made γ ~3e12: a saturated sigmoid that gives γ and τ no gradient in stage 2."""
    s_t = torch.cat([torch.full((50,), 0.5), torch.linspace(0.5, 1.0, 50)])
    s_p = torch.cat([torch.linspace(0.0, 0.5, 50), torch.full((50,), 0.5)])
    with pytest.warns(UserWarning):
        gamma, tau = G.calibrate(s_t, s_p)
    assert math.isfinite(gamma) and 0 < gamma < 1e3, gamma  # old code: 2.9e12
    # a token a twentieth of the scores' spread from tau must still be in the sigmoid's live range, so gamma and
    # tau get a gradient (old code: gamma 2.9e12, every such token saturated at 0 or 1)
    spread = float(torch.cat([s_t, s_p]).std())
    gates = torch.sigmoid(gamma * torch.tensor([-0.05 * spread, 0.05 * spread]))
    assert ((gates > 0.01) & (gates < 0.99)).all(), gates


def test_fit_gate_shuts_hard_negatives_that_calibration_lets_through():
    """A few negatives (0.8 %) share the targets' main direction and differ only in a weaker one: with the targets'
    top direction, calibrated at the 99th percentile of all negatives, the gate opens on them; fitted against its
    hardest negatives it shuts on held-out ones of the same kind and stays open on held-out targets."""
    from ace_lightning.method import gate as G

    g = torch.Generator().manual_seed(0)
    d = 16
    e1, e2 = torch.eye(d)[0], torch.eye(d)[1]

    def cloud(centre, n):  # (d, n)
        return (centre[:, None] + 0.08 * torch.randn(d, n, generator=g))

    C, C_test = cloud(e1 + 0.5 * e2, 64), cloud(e1 + 0.5 * e2, 64)  # targets
    H, H_test = cloud(e1 + 0.1 * e2, 40), cloud(e1 + 0.1 * e2, 64)  # hard negatives: same e1, less e2
    P = torch.cat([torch.randn(d, 5000, generator=g), H], 1)
    Q = G.gate_directions(C, 1)  # (d, 1)
    gamma, tau = G.calibrate(G.scores(Q, C), G.scores(Q, P))

    def gate(Q, gamma, tau, X):  # (n,) gate values of columns X
        return torch.sigmoid(gamma * (G.scores(Q, X) - tau))

    assert (gate(Q, gamma, tau, H_test) > 0.5).float().mean() > 0.5  # calibration lets them through
    Qf, gf, tf = G.fit_gate(Q, gamma, tau, C, P, steps=600, hard_k=64, sample_k=1024)
    assert gf == 1.0 and Qf.shape == Q.shape
    assert (gate(Qf, gf, tf, H_test) > 0.5).float().mean() <= 0.05
    assert (gate(Qf, gf, tf, C_test) > 0.5).float().mean() >= 0.95
    assert (gate(Qf, gf, tf, torch.randn(d, 2000, generator=g)) > 0.5).float().mean() <= 0.01
    assert G.fit_gate(Q, gamma, tau, C, P, steps=0) == (Q, gamma, tau)  # 0 steps: the calibration as it was


def test_fit_gate_opens_on_extra_positives_without_opening_on_negatives():
    """Adversarial gate positives (``C_extra``): a few tokens that restore the concept without looking like its
    tokens (another direction). The fitted gate was shut on them; refitted with them as a positive term of its own
    it opens on held-out ones of their kind, stays open on the targets and shut on the negatives."""
    g = torch.Generator().manual_seed(1)
    d = 16
    e1, e3 = torch.eye(d)[0], torch.eye(d)[2]

    def cloud(centre, n):  # (d, n)
        return centre[:, None] + 0.08 * torch.randn(d, n, generator=g)

    C, C_test = cloud(e1, 400), cloud(e1, 64)
    X, X_test = cloud(e3, 12), cloud(e3, 64)  # 12 adversarial tokens against 400 targets
    P = torch.randn(d, 5000, generator=g)
    P[2] *= 0.1  # the negatives have little along e3
    Q = G.gate_directions(C, 2)
    gamma, tau = G.calibrate(G.scores(Q, C), G.scores(Q, P))
    Q0, g0, t0 = G.fit_gate(Q, gamma, tau, C, P, steps=300, hard_k=64, sample_k=1024)

    def gate(Q, gamma, tau, Y):
        return torch.sigmoid(gamma * (G.scores(Q, Y) - tau))

    assert (gate(Q0, g0, t0, X_test) > 0.5).float().mean() <= 0.05  # shut on them before
    Qx, gx, tx = G.fit_gate(Q0, g0, t0, C, P, steps=300, hard_k=64, sample_k=1024, C_extra=X)
    assert (gate(Qx, gx, tx, X_test) > 0.5).float().mean() >= 0.9
    assert (gate(Qx, gx, tx, C_test) > 0.5).float().mean() >= 0.95
    assert (gate(Qx, gx, tx, torch.randn(d, 2000, generator=g) * torch.tensor([1.0, 1.0, 0.1] + [1.0] * 13)[:, None])
            > 0.5).float().mean() <= 0.02


def test_adversarial_gate_tokens_take_the_slots_and_the_concept_where_it_stays():
    from ace_lightning.method.attack import adversarial_gate_tokens, insert_placeholders

    EOS = 9
    ids = torch.tensor([[0, 5, 6, 7, EOS, EOS, EOS, EOS, EOS, EOS]])  # BOS a b <concept> EOS ...
    span = torch.tensor([[3, 4]])
    c = torch.arange(10.0)[None, :, None].expand(1, 10, 2)  # position i encodes as (i, i)
    pre_ids, pre_pos = insert_placeholders(ids, span, 2, "prefix", EOS)  # BOS s s a b <concept> EOS
    got = adversarial_gate_tokens(c, pre_ids, pre_pos, ids, span)[0, :, 0].tolist()
    assert got == [1.0, 2.0, 5.0]  # the slots, then the concept's token after them
    rep_ids, rep_pos = insert_placeholders(ids, span, 2, "replace", EOS)  # BOS a b s s EOS: the concept is gone
    assert adversarial_gate_tokens(c, rep_ids, rep_pos, ids, span)[0, :, 0].tolist() == [3.0, 4.0, 4.0]


def _gate_set(g, d, centre, n):
    C = centre[:, None] + 0.1 * torch.randn(d, n, generator=g)  # (d, n)
    return C


@pytest.mark.parametrize("q_neg", [0, 1])
def test_fit_gates_batched_equals_one_gate_at_a_time(q_neg):
    """k gates of different target counts fitted at once give each gate what fitting it alone gives (each gate's
    loss is its own; the padding of the smaller target sets must not count); signed gates (``q_neg``) alike."""
    g = torch.Generator().manual_seed(3)
    d = 24
    P = torch.randn(d, 6000, generator=g)
    gates = []
    for n in (30, 70, 45):
        C = _gate_set(g, d, torch.randn(d, generator=g), n)
        Q = G.gate_directions(C, 3)
        gamma, tau = G.calibrate(G.scores(Q, C), G.scores(Q, P))
        Q = torch.cat([Q, 0.01 * torch.randn(d, q_neg, generator=g)], 1)  # the negative column starts small
        gates.append((Q, gamma, tau, C))
    Qb, taus = G.fit_gates(torch.stack([q for q, *_ in gates]), [x[1] for x in gates], [x[2] for x in gates],
                           [x[3] for x in gates], P, steps=80, hard_k=128, sample_k=512, q_neg=q_neg)
    for (Q, gamma, tau, C), Qi, ti in zip(gates, Qb, taus):
        Q1, g1, t1 = G.fit_gate(Q, gamma, tau, C, P, steps=80, hard_k=128, sample_k=512, q_neg=q_neg)
        assert g1 == 1.0 and not torch.equal(Q1, Q * math.sqrt(gamma))  # it moved
        assert torch.allclose(Qi, Q1, atol=1e-5, rtol=1e-4) and ti == pytest.approx(t1, rel=1e-5)


def test_fit_gates_own_negatives_shut_only_their_gate():
    """Gate 0's hard negatives (a cloud next to its targets) are passed as its own: gate 0 shuts on held-out ones
    of that cloud, and gate 1, which never saw them, is fitted exactly as without them."""
    g = torch.Generator().manual_seed(4)
    d = 16
    e = torch.eye(d)
    C0, C1 = _gate_set(g, d, e[0] + 0.5 * e[1], 64), _gate_set(g, d, e[2], 64)
    H0, H0_test = _gate_set(g, d, e[0] + 0.1 * e[1], 40), _gate_set(g, d, e[0] + 0.1 * e[1], 64)
    P = torch.randn(d, 4000, generator=g)
    Q = torch.stack([G.gate_directions(C, 1) for C in (C0, C1)])  # (2, d, 1)
    cal = [G.calibrate(G.scores(q, C), G.scores(q, P)) for q, C in zip(Q, (C0, C1))]

    def fit(neg):
        return G.fit_gates(Q, [c[0] for c in cal], [c[1] for c in cal], [C0, C1], P, neg, steps=400, hard_k=64,
                           sample_k=1024)

    def fires(Qi, tau, X):  # fraction of columns X the fitted gate (γ = 1) opens on
        return float((torch.sigmoid(G.scores(Qi, X) - tau) > 0.5).float().mean())

    (Qa, ta), (Qn, tn) = fit([H0, None]), fit(None)
    assert fires(Qn[0], tn[0], H0_test) > 0.5  # without them gate 0 opens on that cloud
    assert fires(Qa[0], ta[0], H0_test) <= 0.05 and fires(Qa[0], ta[0], C0) >= 0.95
    assert torch.allclose(Qa[1], Qn[1], atol=1e-6) and ta[1] == pytest.approx(tn[1])


def test_sibling_negatives_shut_a_gate_on_a_look_neighbour_of_its_concept():
    """Names learned with a look share it: erased 'a' and 'b' and the retained 'r' are one shared component plus
    a small one of their own. Fitted against generic tokens, a's gate opens on r; fitted with b's targets as
    negatives too (``adapter.gate_sibling_negatives``), it must use a's own component and shuts on r."""
    from types import SimpleNamespace

    from ace_lightning.method.adapter import AdapterBank
    from ace_lightning.method.initialize import initialize_bank, sibling_targets

    g = torch.Generator().manual_seed(0)
    d, n = 32, 40
    look, own = torch.randn(d, 1, generator=g), torch.randn(d, 3, generator=g)  # shared; a's, b's, r's own

    def name(i):  # (d, n): the look, the name's own part, context noise
        return 3 * look + own[:, i : i + 1] + 0.3 * torch.randn(d, n, generator=g)

    C_a, C_b, R = name(0), name(1), name(2)
    P = torch.randn(d, 2000, generator=g)  # generic tokens
    concepts = [SimpleNamespace(request=SimpleNamespace(concept=k), C=C, N=torch.zeros(d, n), gate_pos=None)
                for k, C in (("a", C_a), ("b", C_b))]
    assert torch.equal(sibling_targets(concepts, concepts[0]), C_b)
    cf = SimpleNamespace(enabled=True, lam=0.1, s_e=1.0, s_p=1.0)
    opened = {}
    for siblings in (False, True):
        bank = AdapterBank(d, {"w": 8})
        acfg = SimpleNamespace(rank=4, gate_q=4, gate_directions="contrast", gate_project_out=0, gate_hard_rounds=0,
                               gate_target=0.95, gate_fit_steps=200, gate_carry=False, ungated=False,
                               gate_sibling_negatives=siblings, gate_neg_q=0)
        initialize_bank(bank, {"w": torch.randn(8, d, generator=torch.Generator().manual_seed(1))}, concepts, P, cf,
                        acfg)
        with torch.no_grad():
            gate = bank["a"].gate
            opened[siblings] = (float((gate(R.T) > 0.5).float().mean()), float((gate(C_a.T) > 0.5).float().mean()))
    assert opened[False][0] > 0.5, opened  # the look neighbour opens a's gate fitted on generic tokens alone
    assert opened[True][0] < 0.1, opened  # not once b's targets are its negatives
    assert opened[True][1] > 0.9, opened  # and a's gate still opens on a


def test_fit_gates_keep_term_shuts_every_gate_on_the_keep_list():
    """``keep``: tokens the user asked to keep, near the targets and absent from the shared negatives (the keep
    names in contexts the preserve prompts never used). Without the term the fitted gate opens on held-out ones of
    their kind; with it, it shuts on most of them and stays open on the targets and shut on random tokens."""
    from ace_lightning.method import gate as G

    g = torch.Generator().manual_seed(2)
    d = 16
    e1, e3 = torch.eye(d)[0], torch.eye(d)[2]

    def cloud(centre, n):  # (d, n)
        return centre[:, None] + 0.08 * torch.randn(d, n, generator=g)

    C, C_test = cloud(e1 + 0.8 * e3, 400), cloud(e1 + 0.8 * e3, 64)
    K, K_test = cloud(e1 + 0.4 * e3, 12), cloud(e1 + 0.4 * e3, 64)
    P = torch.randn(d, 5000, generator=g)
    Q = G.gate_directions(C, 2)
    gamma, tau = G.calibrate(G.scores(Q, C), G.scores(Q, P))

    def open_share(Q, tau, X):
        return float((torch.sigmoid(G.scores(Q, X) - tau) > 0.5).float().mean())

    fits = {name: G.fit_gates(Q[None], [gamma], [tau], [C], P, steps=300, sample_k=1024, keep=keep)
            for name, keep in (("without", None), ("with", K))}
    (Qn, tn), (Qk, tk) = fits["without"], fits["with"]
    assert open_share(Qn[0], tn[0], K_test) >= 0.9
    assert open_share(Qk[0], tk[0], K_test) <= 0.25
    assert open_share(Qk[0], tk[0], C_test) >= 0.9
    assert open_share(Qk[0], tk[0], torch.randn(d, 2000, generator=g)) <= 0.01


def test_unit_scores_of_signed_gates_equal_their_signed_energy():
    """``unit_scores(..., q_negs=)``: one pass gives every gate's score less its last q_neg columns' energy, as
    :func:`signed_energy` scores one gate (gates of different widths and signs in one call)."""
    g = torch.Generator().manual_seed(0)
    X_hat = G.unit_columns(torch.randn(12, 50, generator=g))  # (d, m)
    Qs = [torch.randn(12, q, generator=g) for q in (3, 5, 4)]
    q_negs = [0, 2, 1]
    got = G.unit_scores(X_hat, Qs, chunk=7, q_negs=q_negs)  # (m, 3)
    want = torch.stack([G.signed_energy(X_hat.T @ Q.double(), r) for Q, r in zip(Qs, q_negs)], 1)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got[:, 1], G.unit_scores(X_hat, Qs[1:2])[:, 0])  # the sign counted
