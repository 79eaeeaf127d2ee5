"""Regression tests for the correctness pass (issue 7): each one failed on the code before its fix."""

from types import SimpleNamespace

import pytest
import torch

from ace_lightning.method.adapter import GatedLoRALinear, base_weights, inject, remove


def _concept(name, d, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(request=SimpleNamespace(concept=name), C=torch.randn(d, n, generator=g),
                           N=torch.randn(d, n, generator=g))


ACFG = dict(rank=3, gate_q=2, gate_directions="contrast", gate_project_out=0, gate_hard_rounds=0, gate_target=0.95,
            gate_fit_steps=0, gate_carry=False, gate_sibling_negatives=False, gate_neg_q=0,
            targets=["to_k", "to_v"])
CF = SimpleNamespace(enabled=True, lam=0.1, s_e=1.0, s_p=1.0)


# -- bug 1: an ungated adapter applies the whole edit ---------------------------------------------------
def test_ungated_adapter_applies_whole_edit(tiny_components, tmp_path):
    from ace_lightning.data.prompts import ErasureRequest
    from ace_lightning.export import load_into, save_adapter
    from ace_lightning.method.initialize import initialize_bank
    from ace_lightning.models.loading import load_components, model_fingerprint

    unet = tiny_components.unet
    bank = inject(unet)
    d = bank.d
    P = torch.randn(d, 40, generator=torch.Generator().manual_seed(9))
    initialize_bank(bank, base_weights(unet), [_concept("dog", d)], P, CF, SimpleNamespace(**ACFG, ungated=True))
    ad = bank["dog"]
    assert ad.B[next(iter(ad.B))].abs().max() > 0  # a real, non-zero edit

    def check(u):
        c = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(1))
        for mod in u.modules():
            if isinstance(mod, GatedLoRALinear):
                a = mod.bank.concepts["dog"]
                want = mod.base_layer(c) + c @ a.A.T @ a.B[mod.key].T  # W c + B A c
                torch.testing.assert_close(mod(c), want, rtol=1e-5, atol=1e-6)

    check(unet)
    path = save_adapter(tmp_path / "a.safetensors", bank, [ErasureRequest("dog", "object", "animal")],
                        tiny_components.source, model_fingerprint(unet), ["to_k", "to_v"])
    fresh = load_components(tiny_components.source)
    load_into(fresh.unet, path)
    check(fresh.unet)  # the file keeps the adapter ungated


# -- bug 2: half precision --------------------------------------------------------------------------
def _adapter_file(tiny_components, tmp_path):
    from ace_lightning.data.prompts import ErasureRequest
    from ace_lightning.export import save_adapter
    from ace_lightning.method.initialize import initialize_bank
    from ace_lightning.models.loading import model_fingerprint

    unet = tiny_components.unet
    bank = inject(unet)
    P = torch.randn(bank.d, 40, generator=torch.Generator().manual_seed(9))
    initialize_bank(bank, base_weights(unet), [_concept("dog", bank.d)], P, CF, SimpleNamespace(**ACFG, ungated=True))
    path = save_adapter(tmp_path / "a.safetensors", bank, [ErasureRequest("dog", "object", "animal")],
                        tiny_components.source, model_fingerprint(unet), ["to_k", "to_v"], unet=unet)
    remove(unet)
    return path


def _latents(pipe, steps=3):
    from ace_lightning.models.sampling import generate

    return generate(pipe, ["a dog", "a photo of a dog"], [0, 1], steps, 5.0, output_type="latent", progress=False)


def test_half_precision_pipelines(tiny_components, tmp_path):
    from diffusers import StableDiffusionPipeline

    from ace_lightning import apply_adapter, remove_adapter

    path = _adapter_file(tiny_components, tmp_path)
    kw = dict(safety_checker=None, requires_safety_checker=False)
    fp32 = StableDiffusionPipeline.from_pretrained(tiny_components.source, **kw)
    fp32.set_progress_bar_config(disable=True)
    base32 = _latents(fp32)
    apply_adapter(fp32, path)
    edited32 = _latents(fp32)
    effect = (edited32 - base32).abs().mean()
    assert effect > 1e-3  # the adapter changes generations, so "close to fp32" below means something

    # the same model loaded in bfloat16: the adapter applies and generates close to the fp32 result
    bf = StableDiffusionPipeline.from_pretrained(tiny_components.source, torch_dtype=torch.bfloat16, **kw)
    bf.set_progress_bar_config(disable=True)
    base_bf = _latents(bf)
    apply_adapter(bf, path)
    edited_bf = _latents(bf)
    # tolerance: bf16 keeps 8 bits of mantissa; measured mean |diff| 0.034 vs the adapter's effect 0.48 (3 steps)
    err = (edited_bf - edited32).abs().mean()
    assert err < 0.25 * effect, (float(err), float(effect))
    remove_adapter(bf)
    assert torch.equal(_latents(bf), base_bf)  # remove restores exactly

    # apply in fp32, then cast the whole pipeline: the bank stays float32 and the next forward works
    fp32.to(torch.bfloat16)
    from ace_lightning.method.adapter import bank_of

    assert all(p.dtype == torch.float32 for p in bank_of(fp32.unet).parameters())
    cast = _latents(fp32)
    assert (cast - edited32).abs().mean() < 0.25 * effect
    remove_adapter(fp32)
    assert torch.equal(_latents(fp32), base_bf)


def test_fingerprint_still_refuses_another_model_in_half_precision(tiny_components, tiny_v2_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from ace_lightning import apply_adapter
    from ace_lightning.export import AdapterError

    path = _adapter_file(tiny_components, tmp_path)
    bf = StableDiffusionPipeline.from_pretrained(tiny_components.source, torch_dtype=torch.bfloat16,
                                                 safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():  # a fine-tune-sized change to one edited projection
        w = next(m for n, m in bf.unet.named_modules() if n.endswith("attn2.to_v")).weight
        w.mul_(1.05)
    with pytest.raises(AdapterError, match="fingerprint"):
        apply_adapter(bf, path)


# -- bug 3: soft-prompt slots per row ------------------------------------------------------------------
def test_replace_slots_land_on_each_rows_phrase(tiny_components):
    from ace_lightning.method.attack import insert_placeholders
    from ace_lightning.method.text import find_span, phrase_ids, tokenize

    tok = tiny_components.tokenizer
    prompts = ["a dog", "a photo of a big dog on a table", "dog", "a painting of a dog in a field"]
    ids = tokenize(tok, prompts)
    dog = phrase_ids(tok, "dog")
    span = torch.tensor([find_span(r, dog) for r in ids.tolist()])
    assert len(set(span[:, 0].tolist())) > 1  # the rows really differ
    out, pos = insert_placeholders(ids, span, 2, "replace", tok.eos_token_id)
    pos = torch.as_tensor(pos)
    assert pos.shape == (4, 2)
    for i in range(4):
        assert dog[0] not in out[i].tolist(), (prompts[i], out[i])  # no row keeps the concept in plain text
        assert pos[i].tolist() == [int(span[i, 0]), int(span[i, 0]) + 1]  # every slot lands on the phrase
        # the tokens after the phrase follow the slots, unchanged
        rest = ids[i, int(span[i, 1]):].tolist()
        assert out[i, int(span[i, 0]) + 2:].tolist()[: len(rest) - 1] == rest[: len(rest) - 1]


def test_soft_prompt_attack_rows_are_independent(tiny_components):
    """One adversarial embedding per row: a row's result does not depend on the other rows of the batch."""
    from ace_lightning.method.attack import insert_placeholders, soft_prompt_attack
    from ace_lightning.method.text import find_span, phrase_ids, tokenize

    tok, te, unet = tiny_components.tokenizer, tiny_components.text_encoder, tiny_components.unet
    prompts, phrases = ["a photo of a dog", "a cat on a table"], ["dog", "cat"]
    ids = tokenize(tok, prompts)
    span = torch.tensor([find_span(r, phrase_ids(tok, p)) for r, p in zip(ids.tolist(), phrases)])
    ids2, pos = insert_placeholders(ids, span, 2, "replace", tok.eos_token_id)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([300, 600])
    both, _ = soft_prompt_attack(unet, te, ids2, pos, x, t, eps, steps=3, lr=0.05, init_ids=ids, init_span=span)
    one, _ = soft_prompt_attack(unet, te, ids2[:1], pos[:1], x[:1], t[:1], eps[:1], steps=3, lr=0.05,
                                init_ids=ids[:1], init_span=span[:1])
    torch.testing.assert_close(both[:1], one, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        from ace_lightning.method.text import encode_ids

        plain = encode_ids(te, ids2)
    assert (both - plain).abs().amax(dim=(1, 2)).min() > 1e-4  # every row was attacked


# -- bug 5: training noise follows the training schedule, not the sampler -----------------------------
def test_training_noise_uses_ddpm_schedule_with_euler_model(tiny_model_dir, tmp_path):
    from diffusers import EulerDiscreteScheduler

    from ace_lightning.models.loading import load_components
    from ace_lightning.models.sampling import training_noise_scheduler

    comps = load_components(str(tiny_model_dir))
    euler = EulerDiscreteScheduler.from_config(comps.scheduler.config)
    sch = training_noise_scheduler(euler)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, 4, 8, 8, generator=g), torch.randn(64, 4, 8, 8, generator=g)
    t = torch.full((64,), 999)
    x_t = sch.add_noise(x0, noise, t)
    # DDPM at t = 999: sqrt(ab) x0 + sqrt(1 - ab) eps has unit variance (Euler gives x0 + 14.6 eps)
    assert 0.9 < float(x_t.std()) < 1.1
    ab = sch.alphas_cumprod[999]
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)


def test_euler_model_trains_on_ddpm_inputs(tiny_model_dir, tmp_path, monkeypatch):
    """A model saved with an Euler scheduler: the UNet's training inputs are exactly DDPM's
    ``sqrt(ab_t) x0 + sqrt(1 - ab_t) eps`` (old code: Euler's ``x0 + sigma_t eps``)."""
    import json
    import shutil

    import lightning as L
    from diffusers import EulerDiscreteScheduler
    from test_training import tiny_cfg

    import ace_lightning.train as T
    from ace_lightning.train import run

    model = tmp_path / "euler_model"
    shutil.copytree(tiny_model_dir, model)
    EulerDiscreteScheduler.from_pretrained(model / "scheduler").save_pretrained(model / "scheduler")
    index = json.loads((model / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]  # the class the pipeline loads
    (model / "model_index.json").write_text(json.dumps(index))
    calls, batches = [], []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batches.append((len(calls), {k: v.clone() for k, v in batch.items()}))

    orig_load, orig_init = T.load_components, L.Trainer.__init__

    def load(*a, **kw):
        comps = orig_load(*a, **kw)
        comps.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].detach().float().clone()))
        return comps

    def init(self, *a, **kw):
        kw["callbacks"] = [*kw.get("callbacks", []), Spy()]
        orig_init(self, *a, **kw)

    monkeypatch.setattr(T, "load_components", load)
    monkeypatch.setattr(L.Trainer, "__init__", init)
    run(tiny_cfg(model, tmp_path / "out", "trainer.max_steps=2", "adv.enabled=false"))
    assert len(batches) == 2 and type(T.load_components(str(model)).scheduler).__name__ == "EulerDiscreteScheduler"
    # the training schedule, from the model's betas (scaled_linear 0.00085 .. 0.012, 1000 steps)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0)
    for start, b in batches:
        a = ab[b["t"]].float().view(-1, 1, 1, 1)
        want = a.sqrt() * b["x0"] + (1 - a).sqrt() * b["noise"]  # (B, c, h, w)
        x_in = calls[start][: len(want)]  # the step's first UNet call: frozen predictions on [x_t, x_t, x_p]
        torch.testing.assert_close(x_in, want, rtol=1e-4, atol=1e-5)


# -- bug 4: mined neighbours never take another known concept, only whole words that are really close ----
def test_mined_neighbours_exclude_known_concepts():
    from ace_lightning.data.prompts import ErasureRequest, known_words, mine_neighbours
    from ace_lightning.models.loading import load_components

    comps = load_components(None)  # ToyWorld
    reqs = {"square": ErasureRequest("square", "object", "shape", ["box", "block"]),
            "star": ErasureRequest("star", "object", "shape", ["pentagram", "sparkle"]),
            "mivelle": ErasureRequest("mivelle", "person", "someone")}
    forbidden = {"ring", "solid", "filled", "sign", "plus", "valentine", "round", "circle", "heart", "cross"}
    for name, req in reqs.items():
        exclude = known_words([req], source=comps.source)
        assert forbidden <= exclude, forbidden - exclude
        found = mine_neighbours(comps.text_encoder, comps.tokenizer, req, 3, 4000, exclude, None)
        words = [w for w, _ in found]
        assert not set(words) & forbidden, (name, found)
        assert all(w.isascii() and w.isalpha() for w in words), found
        assert all(s["z"] >= 3.0 for _, s in found), found  # clearly closer than random vocabulary words


# -- found at 100 concepts (issue 13): the vocabulary was encoded again for every concept's neighbours ----------
def test_mined_neighbours_encode_the_vocabulary_once_for_every_concept(monkeypatch):
    """With the caller's ``memo`` the 4000 candidate words are encoded once for all concepts (they were encoded once
    per concept: 400,000 passes at 100 names), and every concept finds the same words as without it."""
    import ace_lightning.method.text as text
    from ace_lightning.data.prompts import ErasureRequest, known_words, mine_neighbours
    from ace_lightning.models.loading import load_components

    comps = load_components(None)  # ToyWorld
    reqs = [ErasureRequest(c, "object", "shape") for c in ("square", "star", "heart")]
    exclude = known_words(reqs, source=comps.source)
    plain = [mine_neighbours(comps.text_encoder, comps.tokenizer, r, 3, 4000, exclude, None) for r in reqs]
    sizes, encode = [], text.last_word_states
    monkeypatch.setattr(text, "last_word_states", lambda te, tok, p, **kw: sizes.append(len(p)) or encode(te, tok, p, **kw))
    memo: dict = {}
    shared = [mine_neighbours(comps.text_encoder, comps.tokenizer, r, 3, 4000, exclude, None, memo=memo) for r in reqs]
    assert shared == plain and any(plain)
    assert sizes.count(1) == len(reqs) and sum(sizes) == len(reqs) + len(memo[("vocab", 4000)]), sizes


# -- found at 10 concepts (issue 13): every gate's fit set was kept, refits or not -------------------------
@pytest.mark.parametrize("refit_steps", [0, 5])
def test_gate_fit_sets_are_kept_only_when_gates_are_refitted(tiny_components, refit_steps):
    """Each concept's fit negatives are the whole preserve set plus its hard negatives (339k tokens on ToyWorld). They
    were kept for every concept even without ``adv.gate_refit_steps``: 10.6 GB peak RSS at 10 concepts. Kept
    only for the refits that use them."""
    from ace_lightning.callbacks.closed_form import ClosedFormInit

    unet = tiny_components.unet
    bank = inject(unet)
    d = bank.d
    P = torch.randn(d, 40, generator=torch.Generator().manual_seed(9))
    concepts = [_concept("dog", d), _concept("cat", d, seed=1)]
    for cd in concepts:
        cd.gate_pos = None
    dm = SimpleNamespace(setup=lambda stage: None, P_vocab_gate=P, P=P, P_gate=P, P_keep=None, concepts=concepts,
                         hard_negatives=lambda cd, score: torch.randn(d, 5), hard_positives=lambda cd: torch.zeros(d, 0),
                         extra_preserve=None, add_extra_preserves=lambda gate: [])
    kept = {}
    module = SimpleNamespace(bank=bank, unet=unet, device="cpu", adv=SimpleNamespace(gate_refit_steps=refit_steps),
                             set_gate_vocabulary=lambda t: None, set_gate_fit_sets=kept.update)
    acfg = SimpleNamespace(**{**ACFG, "gate_fit_steps": 3}, ungated=False)
    ClosedFormInit(CF, acfg).setup(SimpleNamespace(datamodule=dm), module, "fit")
    assert set(kept) == ({"dog", "cat"} if refit_steps else set())
