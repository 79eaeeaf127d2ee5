"""The method registry (issue 10): every method trains on a tiny model and gives an adapter file that a stock
pipeline applies and removes bit-for-bit; ESD touches only its weights; UCE is the direct closed-form update."""

from types import SimpleNamespace

import pytest
import torch
from test_training import tiny_cfg

from ace_lightning.config import load_config
from ace_lightning.registry import ConfigError, names
from ace_lightning.train import run

METHODS = ["ace", "uce", "esd_x", "esd_u", "advunlearn", "mace"]


def _text_out(pipe):
    ids = pipe.tokenizer(["a dog on a hill"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    c = torch.randn(1, 6, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=c).sample


def test_methods_are_registered_and_unknown_ones_refused():
    assert set(METHODS + ["ace_ungated", "ace_no_closed_form", "ace_closed_form_only", "ace_no_adv", "ace_eta0"]) <= set(
        names("method"))
    with pytest.raises(ConfigError, match="unknown method 'esd_z'; valid: .*esd_x"):
        load_config(["concept=circle", "method=esd_z"])
    uce = load_config(["concept=circle", "method=uce"])
    assert uce.adapter.ungated and uce.trainer.max_steps == 0 and uce.method == "uce"
    esd = load_config(["concept=circle", "method=esd_x", "trainer.max_steps=7"])  # the command line wins
    assert esd.optim.lr == 1e-5 and esd.trainer.max_steps == 7 and not esd.adv.enabled


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_its_adapter_applies_and_removes_bit_for_bit(method, tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from ace_lightning import apply_adapter, remove_adapter
    from ace_lightning.export import read_adapter

    steps = 0 if method == "uce" else 2  # UCE is closed-form only
    m = run(tiny_cfg(tiny_model_dir, tmp_path, f"method={method}", f"trainer.max_steps={steps}", "optim.lr=1e-2"))
    # UNet passes: the training steps' (frozen and trained predictions) plus any latents not yet cached
    # (at least two frozen and one trained prediction per row and step; MACE's loss has no frozen target)
    per_step = 1 if method == "mace" else 3  # MACE: one pass of the trained copy (its loss needs no frozen target)
    assert m["cost/unet_forward_samples"] >= per_step * steps and m["cost/text_encoder_forward_samples"] > 0
    assert m["cost/peak_rss_mib"] > 0 and m["cost/adapt_seconds"] > 0
    assert (m["cost/finetune_seconds"] > 0) == (steps > 0)
    assert m["cost/optimizer_steps"] == steps and (m["cost/unet_backward_samples"] > 0) == (steps > 0)
    if method == "advunlearn":  # the inner attack's backward passes count too (adv.steps=2 per step here)
        assert m["cost/unet_backward_samples"] >= steps * 3
    path = tmp_path / "dog" / "adapter.safetensors"
    tensors, meta = read_adapter(path)
    dense = method.startswith("esd") or method in ("advunlearn", "mace")
    assert meta["method"] == method and meta["kind"] == ("delta" if dense else "gated_lora")

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None, requires_safety_checker=False)
    before = {k: v.clone() for part in (pipe.unet, pipe.text_encoder) for k, v in part.state_dict().items()}
    ref, ref_text = _unet_out(pipe.unet), _text_out(pipe)
    apply_adapter(pipe, path)
    if method == "advunlearn":  # the text encoder changes, the UNet does not
        assert not torch.equal(_text_out(pipe), ref_text) and torch.equal(_unet_out(pipe.unet), ref)
    else:
        assert not torch.equal(_unet_out(pipe.unet), ref) and torch.equal(_text_out(pipe), ref_text)
    remove_adapter(pipe)
    assert torch.equal(_unet_out(pipe.unet), ref) and torch.equal(_text_out(pipe), ref_text)
    after = {k: v for part in (pipe.unet, pipe.text_encoder) for k, v in part.state_dict().items()}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)

    if method == "advunlearn":  # only the configured layer (0) of the text encoder
        assert tensors and all(k.startswith("text_encoder.") and "encoder.layers.0." in k for k in tensors)
        assert any(float(t.abs().max()) > 0 for t in tensors.values())

    if method == "mace":  # the refined (and fused) cross-attention keys and values, nothing else
        names = {k.removeprefix("unet.") for k in tensors}
        assert names and all(".attn2." in n and n.endswith(("to_k.weight", "to_v.weight")) for n in names)
        assert any(n.endswith("to_k.weight") for n in names) and any(n.endswith("to_v.weight") for n in names)
        assert all(float(t.abs().max()) > 0 for t in tensors.values())

    if method.startswith("esd"):  # only the method's weights are stored and changed
        unet_names = {k.removeprefix("unet.") for k in tensors}
        cross = {n for n in unet_names if ".attn2." in n}
        if method == "esd_x":
            assert unet_names == cross and any(n.endswith("to_q.weight") for n in unet_names)
        else:
            assert not cross and not any(n.startswith(("time_embedding.", "conv_out.")) for n in unet_names)
            assert any(".resnets." in n for n in unet_names)
        assert any(float(t.abs().max()) > 0 for t in tensors.values())


@pytest.mark.parametrize("method", ["esd_x", "mace"])
def test_dense_methods_write_the_before_after_grid(method, tiny_model_dir, tmp_path):
    """The run's image grid renders every method's edit (it read ACE's adapter bank, so a dense method's run
    crashed at the end of training, before its adapter was written)."""
    from PIL import Image

    run(tiny_cfg(tiny_model_dir, tmp_path, f"method={method}", "trainer.max_steps=1", "grid.enabled=true",
                 "grid.seeds=[0]", "grid.preserve_prompts=1"))
    assert (tmp_path / "dog" / "adapter.safetensors").is_file()
    with Image.open(tmp_path / "dog" / "grid.png") as im:
        assert im.width > 0 and im.height > 0


def test_uce_is_the_direct_closed_form_update():
    """With UCE's recipe (ungated, rank unbounded) each layer's B A equals W' − W of the direct formula."""
    from ace_lightning.data.prompts import ErasureRequest
    from ace_lightning.method.adapter import AdapterBank
    from ace_lightning.method.closed_form import direct_update
    from ace_lightning.method.initialize import initialize_bank

    cfg = load_config(["concept=circle", "method=uce"])
    g = torch.Generator().manual_seed(0)
    d, n, m = 12, 5, 30
    weights = {"l0": torch.randn(8, d, generator=g), "l1": torch.randn(6, d, generator=g)}
    C, N, P = torch.randn(d, n, generator=g), torch.randn(d, n, generator=g), torch.randn(d, m, generator=g)
    bank = AdapterBank(d, {k: W.shape[0] for k, W in weights.items()})
    concept = SimpleNamespace(request=ErasureRequest("circle", "object", "shape"), C=C, N=N)
    initialize_bank(bank, weights, [concept], P, cfg.closed_form, cfg.adapter)
    ad = bank["circle"]
    assert not ad.gated and float(ad.gate(torch.randn(4, d)).min()) == 1.0
    for k, W in weights.items():
        want = direct_update(W, C, N, P, cfg.closed_form.lam, cfg.closed_form.s_e, cfg.closed_form.s_p) - W.double()
        torch.testing.assert_close((ad.B[k] @ ad.A).double(), want, rtol=1e-4, atol=1e-5)
