"""Adapter contract (spec §4, §7): identity at B=0, exact disable, apply->remove bit-for-bit, save->load."""

import pytest
import torch

from ace_lightning.method import gate as G
from ace_lightning.method.adapter import bank_of, base_weights, inject, remove
from ace_lightning.method.closed_form import preserve_factor, solve_concept


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    c = torch.randn(2, 16, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=c).sample, c


def _fill(bank, unet, name="dog", seed=1, rank=3):
    """A concept with deliberately non-zero A and B (closed form on random embeddings)."""
    g = torch.Generator().manual_seed(seed)
    d = bank.d
    C, N, P = torch.randn(d, rank, generator=g), torch.randn(d, rank, generator=g), torch.randn(d, 20, generator=g)
    res = solve_concept(base_weights(unet), C, N, preserve_factor(P, d, 0.1, 1.0), 1.0, rank)
    ad = bank.add_concept(name, rank=rank, q=2)
    with torch.no_grad():
        ad.A.copy_(res.A)
        for k, B in res.B.items():
            ad.B[k].copy_(B)
        ad.Q = G.gate_directions(C, 2)
        gamma, tau = G.calibrate(G.scores(ad.Q, C), G.scores(ad.Q, P))
        ad.gamma.fill_(gamma)
        ad.tau.fill_(tau)
    return C, P


def test_b_zero_is_identity_and_disable_is_exact(tiny_components):
    unet = tiny_components.unet
    ref, _ = _unet_out(unet)
    n_attn2 = sum(n.endswith("attn2") for n, _ in unet.named_modules())
    bank = inject(unet)
    assert n_attn2 >= 2 and len(bank.layer_shapes) == 2 * n_attn2  # every attn2 x (to_k, to_v)
    ad = bank.add_concept("dog", rank=4, q=2)
    with torch.no_grad():
        ad.A.normal_()  # A non-zero, B = 0: still the identity
        ad.gamma.fill_(10.0)
        ad.tau.fill_(-1.0)  # gate fully open
    out, _ = _unet_out(unet)
    assert torch.equal(out, ref)
    _fill(bank, unet, "cat")
    changed, _ = _unet_out(unet)
    assert (changed - ref).abs().max() > 1e-4  # the edit does something ...
    with bank.disabled():
        off, _ = _unet_out(unet)
    assert torch.equal(off, ref)  # ... and disabling returns the base model exactly
    remove(unet)
    again, _ = _unet_out(unet)
    assert torch.equal(again, ref) and bank_of(unet) is None


def test_apply_remove_bit_for_bit_and_save_load(tiny_components, tmp_path):
    from diffusers import StableDiffusionPipeline

    from ace_lightning import apply_adapter, remove_adapter
    from ace_lightning.data.prompts import ErasureRequest
    from ace_lightning.export import AdapterError, save_adapter
    from ace_lightning.models.loading import model_fingerprint

    unet = tiny_components.unet
    ref, _ = _unet_out(unet)
    bank = inject(unet)
    _fill(bank, unet, "dog")
    edited, _ = _unet_out(unet)
    path = save_adapter(tmp_path / "a.safetensors", bank, [ErasureRequest("dog", "object", "animal")],
                        tiny_components.source, model_fingerprint(unet), ["to_k", "to_v"])
    remove(unet)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_components.source, safety_checker=None,
                                                   requires_safety_checker=False)
    base_pipe_out, _ = _unet_out(pipe.unet)
    assert torch.equal(base_pipe_out, ref)
    apply_adapter(pipe, path)
    loaded, _ = _unet_out(pipe.unet)
    assert torch.equal(loaded, edited)  # save -> load: identical outputs
    with pytest.raises(AdapterError, match="already carries"):
        apply_adapter(pipe, path)
    remove_adapter(pipe)
    restored, _ = _unet_out(pipe.unet)
    assert torch.equal(restored, ref)  # apply -> remove: bit-for-bit

    # mismatched base model: perturb one edited projection
    with torch.no_grad():
        next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_k")).weight[0, 0] += 1.0
    with pytest.raises(AdapterError, match="fingerprint"):
        apply_adapter(pipe, path)
    # corrupted file
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(AdapterError, match="corrupted|readable"):
        apply_adapter(pipe, bad)
    with pytest.raises(AdapterError, match="does not exist"):
        apply_adapter(pipe, tmp_path / "nope.safetensors")


def test_gates_after_calibration(tiny_components):
    bank = inject(tiny_components.unet)
    C, P = _fill(bank, tiny_components.unet, "dog", rank=4)
    ad = bank["dog"]
    g_t, g_p = ad.gate(C.T), ad.gate(P.T)
    # calibrated: the 5th-percentile target gates at 0.95; 1e-3 because quantile interpolation between two
    # tokens does not commute exactly with the sigmoid
    assert float(torch.quantile(g_t, 0.05)) >= 0.95 - 1e-3
    assert float(g_t.min()) > 0.9
    assert float(g_p.mean()) < 0.1


def test_adapter_is_float32_under_half_precision(tiny_components):
    unet = tiny_components.unet.to(torch.bfloat16)
    bank = inject(unet)
    _fill(bank, unet)
    assert all(p.dtype == torch.float32 for p in bank.parameters())
    x = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    c = torch.randn(1, 16, unet.config.cross_attention_dim, dtype=torch.bfloat16)
    out = unet(x, torch.tensor([3]), encoder_hidden_states=c).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_bad_targets(tiny_components):
    with pytest.raises(ValueError, match="not applied to text tokens"):
        inject(tiny_components.unet, ["to_q"])


def test_gate_carry_keeps_the_gate_open_after_the_concept(tiny_components, tmp_path):
    """``carry``: a gate that opened on a token stays open on every later token of that prompt (and only there);
    the flag survives save -> load."""
    from ace_lightning.data.prompts import ErasureRequest
    from ace_lightning.export import load_into, save_adapter
    from ace_lightning.method.adapter import AdapterBank

    d = 8
    bank = AdapterBank(d, {"l": 3})
    ad = bank.add_concept("dog", rank=2, q=1)
    with torch.no_grad():
        ad.Q = torch.eye(d)[:, :1]  # the concept direction: e0
        ad.gamma.fill_(50.0)
        ad.tau.fill_(0.5)
    c = torch.eye(d)[[1, 2, 0, 3, 4]][None]  # (1, 5, d): the concept at position 2
    token_wise = ad.seq_gate(c)[0]
    assert (token_wise > 0.99).tolist() == [False, False, True, False, False]
    ad.carry = True
    carried = ad.seq_gate(c)[0]
    assert (carried > 0.99).tolist() == [False, False, True, True, True]
    assert torch.equal(ad.gate(c), token_wise[None])  # the token-wise gate itself is unchanged
    ad.gated = False  # ungated stays exactly 1 everywhere
    assert torch.equal(ad.seq_gate(c), torch.ones(1, 5))

    unet = tiny_components.unet
    real = inject(unet)
    _fill(real, unet, "dog")
    real["dog"].carry = True
    path = save_adapter(tmp_path / "c.safetensors", real, [ErasureRequest("dog", "object", "animal")],
                        tiny_components.source, "fp", ["to_k", "to_v"])
    remove(unet)
    loaded = load_into(unet, path, check_fingerprint=False)
    try:
        assert loaded["dog"].carry is True
    finally:
        remove(unet)


def test_batched_delta_equals_the_sum_over_concepts_with_their_gates_and_grads():
    """The bank's one-product delta is ``Σ_k g_k(c) B_k A_k c`` with each concept's own gate: concepts of different
    ranks, one ungated, one carrying its gate; and every concept's parameters get the loop's gradients."""
    from ace_lightning.method.adapter import AdapterBank

    g = torch.Generator().manual_seed(0)
    d, o = 12, 7
    bank = AdapterBank(d, {"k": o})
    for i, (rank, gated, carry) in enumerate([(3, True, False), (5, False, False), (2, True, True)]):
        ad = bank.add_concept(f"c{i}", rank=rank, q=4)
        with torch.no_grad():
            ad.A.copy_(torch.randn(rank, d, generator=g))
            ad.B["k"].copy_(torch.randn(o, rank, generator=g))
            ad.Q = torch.randn(d, 4, generator=g)
            ad.gamma.fill_(3.0 + i)
            ad.tau.fill_(0.5 + 0.3 * i)
        ad.gated, ad.carry = gated, carry
    c = torch.randn(2, 6, d, generator=g)

    def loop():
        return sum(ad.seq_gate(c).unsqueeze(-1) * (c @ ad.A.T) @ ad.B["k"].T for ad in bank.concepts.values())

    def grads(y):  # an ungated concept's γ, τ take no part: no gradient (None in the loop, zero batched)
        gs = torch.autograd.grad(y.square().sum(), list(bank.parameters()), allow_unused=True)
        return [torch.zeros_like(p) if gr is None else gr for gr, p in zip(gs, bank.parameters())]

    ref = loop()
    out = bank.delta("k", c)
    assert torch.allclose(out, ref, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(grads(out), grads(ref)))
    gates = bank.gates(c)  # (B, T, n)
    assert torch.equal(gates[..., 1], torch.ones(2, 6))  # ungated: exactly 1
    assert (gates[..., 2].diff(dim=-1) >= 0).all() and not (gates[..., 0].diff(dim=-1) >= 0).all()  # carry: running max


def test_gated_codes_are_computed_once_per_unet_call_and_never_outlive_it(tiny_components, monkeypatch):
    """Within one UNet call every attn2 projection gets the same text states, so the gated codes are computed once
    (not once per projection), with the same output and gradients as without the sharing; a later call after an
    in-place parameter update recomputes them."""
    unet = tiny_components.unet
    bank = inject(unet)
    try:
        _fill(bank, unet, "dog", seed=1)
        _fill(bank, unet, "cat", seed=2)
        g = torch.Generator().manual_seed(0)
        x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, bank.d, generator=g)
        t = torch.tensor([10, 500])
        calls = []
        gates = type(bank).gates
        monkeypatch.setattr(type(bank), "gates", lambda self, c: calls.append(1) or gates(self, c))

        def out_and_grads():
            calls.clear()
            y = unet(x, t, encoder_hidden_states=c).sample
            return y.detach(), torch.autograd.grad(y.square().sum(), list(bank.parameters()), allow_unused=True)

        shared, n_shared = out_and_grads(), len(calls)
        hooks = unet._ace_hooks
        for h in hooks:  # the same UNet without the per-call sharing: one gate computation per projection
            h.remove()
        bank._call = None
        alone, n_alone = out_and_grads(), len(calls)
        assert n_shared == 1 and n_alone == len(base_weights(unet)) > 1, (n_shared, n_alone)
        assert torch.allclose(shared[0], alone[0], atol=1e-6)
        assert all((a is None and b is None) or torch.allclose(a, b, atol=1e-5) for a, b in zip(shared[1], alone[1]))
    finally:
        remove(unet)
    assert not unet._forward_pre_hooks and not unet._forward_hooks  # remove() takes the hooks away too

    bank = inject(unet)  # an update between two calls with the very same text states is seen by the second
    try:
        _fill(bank, unet, "dog", seed=1)
        before, c = _unet_out(unet)
        with torch.no_grad():
            bank["dog"].A.mul_(3.0)
            x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
            again = unet(x, torch.tensor([10, 500]), encoder_hidden_states=c).sample
        assert bank._call is None and not torch.allclose(again, before)
    finally:
        remove(unet)


def test_adapter_runs_under_inference_mode(tiny_components):
    """Generation runs the UNet under ``torch.inference_mode``, whose tensors have no version counter: the per-call
    sharing of the gated codes must not need one (found when a 100-name bench crashed after the sharing landed)."""
    unet = tiny_components.unet
    bank = inject(unet)
    try:
        _fill(bank, unet, "dog", seed=1)
        ref, c = _unet_out(unet)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            out = unet(x, torch.tensor([10, 500]), encoder_hidden_states=c.clone()).sample
        assert torch.allclose(out, ref, atol=1e-6)
    finally:
        remove(unet)


def test_signed_gate_subtracts_its_negative_columns_batched_and_after_save_load(tiny_components, tmp_path):
    """``q_neg``: the last columns of Q count negatively. A token along the concept direction opens the gate, the
    same token with a component on the negative column shuts it; the bank's batched gates equal each concept's
    own, and ``q_neg`` survives save -> load."""
    from ace_lightning.data.prompts import ErasureRequest
    from ace_lightning.export import load_into, save_adapter
    from ace_lightning.method.adapter import AdapterBank

    d = 8
    bank = AdapterBank(d, {"l": 3})
    for name in ("dog", "cat"):
        ad = bank.add_concept(name, rank=2, q=2)
        with torch.no_grad():
            ad.Q = torch.eye(d)[:, [0, 1]] * 2.0 if name == "dog" else torch.eye(d)[:, [2, 3]] * 2.0
            ad.gamma.fill_(10.0)
            ad.tau.fill_(1.0)
        ad.q_neg = 1
    e = torch.eye(d)
    c = torch.stack([e[0], e[0] + e[1], e[2], e[1]])[None]  # (1, 4, d)
    dog = bank["dog"].seq_gate(c)[0]
    assert dog[0] > 0.99 and dog[1] < 0.01 and dog[3] < 0.01  # e0 opens it; e0 + e1 scores 2 - 2 = 0: shut
    assert torch.allclose(bank.gates(c), torch.stack([ad.seq_gate(c) for ad in bank.concepts.values()], -1))
    bank["cat"].q_neg = 0  # widths alike, signs not: the loop, still each concept's own gate
    assert torch.allclose(bank.gates(c)[..., 1], bank["cat"].seq_gate(c))

    unet = tiny_components.unet
    real = inject(unet)
    _fill(real, unet, "dog")
    real["dog"].q_neg = 2
    path = save_adapter(tmp_path / "s.safetensors", real, [ErasureRequest("dog", "object", "animal")],
                        tiny_components.source, "fp", ["to_k", "to_v"])
    remove(unet)
    loaded = load_into(unet, path, check_fingerprint=False)
    try:
        assert loaded["dog"].q_neg == 2
    finally:
        remove(unet)
