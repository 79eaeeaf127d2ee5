"""SDXL layouts (issue 14) on a tiny SDXL model built from config: the packed conditioning equals the stock
pipeline's own encoding, every method trains and its adapter applies to / is removed from a stock
``StableDiffusionXLPipeline`` bit-for-bit, and the closed form is the direct formula at SDXL's 2048 dimensions."""

import pytest
import torch
from test_training import tiny_cfg

from ace_lightning.models.loading import load_components
from ace_lightning.train import run

PROMPTS = ["a dog on a hill", "a cat"]


def test_packed_conditioning_is_the_pipelines_encoding_and_generates_the_same_images(tiny_sdxl_dir):
    from ace_lightning.method.text import encode_prompts
    from ace_lightning.models.conditioning import split_conditioning
    from ace_lightning.models.sampling import generate

    c = load_components(str(tiny_sdxl_dir))
    assert c.family == "StableDiffusionXLPipeline"
    pipe = c.pipeline()
    packed, ids = encode_prompts(c.text_encoder, c.tokenizer, PROMPTS)  # (2, T + 1, 80)
    assert packed.shape == (2, ids.shape[1] + 1, 32 + 48)
    emb, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    hidden, added = split_conditioning(c.unet, packed)
    assert torch.equal(hidden, emb) and torch.equal(added["text_embeds"], pooled)  # "!" padding redone exactly
    assert added["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2  # 8 latent px x VAE factor 4
    by_prompt = generate(pipe, PROMPTS[:1], [3], steps=3, progress=False)
    by_embeds = generate(pipe, PROMPTS[:1], [3], steps=3, progress=False, embeds=packed[:1])
    assert (by_prompt - by_embeds).abs().max() < 1e-5
    with pytest.raises(ValueError, match="unpacked conditioning"):  # an SD-style conditioning is refused
        split_conditioning(c.unet, torch.randn(1, ids.shape[1], 80))


@pytest.mark.parametrize("method", ["ace", pytest.param("esd_x", marks=pytest.mark.slow), "advunlearn"])
def test_method_trains_on_sdxl_and_its_adapter_applies_and_removes_bit_for_bit(method, tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from ace_lightning import apply_adapter, remove_adapter

    m = run(tiny_cfg(tiny_sdxl_dir, tmp_path, f"method={method}", "trainer.max_steps=2", "optim.lr=1e-2",
                     "adv.warmup=1", "adv.every=1", "grid.enabled=true", "grid.seeds=[0]"))
    assert m["train/global_step"] == 2 and m["train/loss"] == m["train/loss"]
    assert (tmp_path / "dog" / "grid.png").is_file()  # drawn by a stock SDXL pipeline with the trained edit in place
    if method == "ace":  # the inner attack ran through the packed conditioning
        assert m["train/adv_attack_loss"] >= 0
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    before = {k: v.clone() for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
              for k, v in part.state_dict().items()}

    def draw():
        return pipe("a dog", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images

    base = draw()
    apply_adapter(pipe, tmp_path / "dog" / "adapter.safetensors")
    edited = draw()
    assert not torch.equal(base, edited)  # the edit changes what the stock pipeline draws
    remove_adapter(pipe)
    after = {k: v for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) for k, v in part.state_dict().items()}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(draw(), base)
    # the same file on another task's pipeline over the same modules (img2img)
    from diffusers import StableDiffusionXLImg2ImgPipeline

    i2i = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    apply_adapter(i2i, tmp_path / "dog" / "adapter.safetensors")
    remove_adapter(i2i)
    assert all(torch.equal(v, before[k]) for part in (i2i.unet, i2i.text_encoder, i2i.text_encoder_2)
               for k, v in part.state_dict().items())


def test_attack_slots_do_not_end_the_prompt_for_the_second_encoder(tiny_sdxl_dir):
    """Placeholder slots (prefix / replace) keep the rest of the prompt for text_encoder_2, whose padding and
    pooled output are read from the ids: the pooled embedding is taken at the real EOS."""
    from ace_lightning.method.attack import insert_placeholders
    from ace_lightning.method.text import eos_position, find_span, phrase_ids, tokenize

    c = load_components(str(tiny_sdxl_dir))
    tok, dual = c.tokenizer, c.text_encoder
    ids = tokenize(tok, ["a photo of a dog on a hill"])
    span = torch.tensor([find_span(ids[0].tolist(), phrase_ids(tok, "dog"))])
    end = eos_position(ids[0].tolist(), tok.eos_token_id)
    for position in ("prefix", "replace"):
        adv, _ = insert_placeholders(ids, span, 2, position, tok.eos_token_id)
        adv_end = eos_position(adv[0].tolist(), tok.eos_token_id)
        assert adv_end >= end  # the slots do not end the prompt
        second = dual.second_ids(adv)
        assert torch.equal(second[0, : adv_end + 1], adv[0, : adv_end + 1])  # "on a hill" reaches encoder 2
        assert (second[0, adv_end + 1 :] == c.extra["tokenizer_2"].pad_token_id).all()


def test_unconditional_is_the_pipelines_and_advunlearn_layers_are_checked_per_encoder(tiny_sdxl_dir):
    from ace_lightning.methods.advunlearn import text_layer_names
    from ace_lightning.models.conditioning import split_conditioning

    c = load_components(str(tiny_sdxl_dir))
    hidden, added = split_conditioning(c.unet, c.unconditional())
    _, neg, _, neg_pooled = c.pipeline().encode_prompt("a dog", device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(hidden, neg) and torch.equal(added["text_embeds"], neg_pooled)  # SDXL base: zeros
    assert not hidden.any() and added["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
    names = text_layer_names(c.text_encoder, [2])  # layer 2 of both encoders
    assert {n.split(".")[0] for n in names} == {"text_encoder", "text_encoder_2"}
    with pytest.raises(ValueError, match=r"layers \[3\] out of range: .*0..2 \(text_encoder\), 0..3 \(text_encoder_2\)"):
        text_layer_names(c.text_encoder, [3])  # only the second encoder has a layer 3


def test_closed_form_is_the_direct_formula_at_2048_dimensions():
    """The shared-factor closed form at SDXL's cross-attention width (d = 2048, an SDXL to_k's 640 outputs) equals
    the direct formula W (λI + s_e N Cᵀ + s_p P Pᵀ)(λI + s_e C Cᵀ + s_p P Pᵀ)⁻¹."""
    from ace_lightning.method.closed_form import concept_delta, direct_update, preserve_factor

    g = torch.Generator().manual_seed(2048)
    d, o, n, m = 2048, 640, 6, 300
    lam, s_e, s_p = 0.3, 1.7, 0.8
    W = torch.randn(o, d, generator=g, dtype=torch.float64) / d**0.5
    C, N = torch.randn(d, n, generator=g, dtype=torch.float64), torch.randn(d, n, generator=g, dtype=torch.float64)
    P = torch.randn(d, m, generator=g, dtype=torch.float64)
    dW = W @ concept_delta(C, N, preserve_factor(P, d, lam, s_p), s_e).dense()  # (o, d)
    ref = direct_update(W, C, N, P, lam, s_e, s_p)
    assert float((W + dW - ref).norm() / ref.norm()) < 1e-8
    assert float(dW.norm()) > 1e-3 * float(W.norm())  # a real edit, not a no-op that matches trivially


def _bench_gpu():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_gpu_refuses_without_cuda_and_runs_its_code_path_tiny(tmp_path, capsys):
    """`make bench-gpu` refuses clearly without CUDA; `--tiny` runs the same path (random-weight SDXL-layout
    pipeline from the configs, the default recipe through train.run) and prints one JSON row with the costs."""
    import json

    bench = _bench_gpu()
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            bench.main(["--out", str(tmp_path / "refused")])
        assert e.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
    (row,) = bench.main(["--tiny", "--models", "sdxl", "--out", str(tmp_path), "--args", "trainer.max_steps=2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row
    assert row["model"] == "sdxl-tiny" and row["steps"] == 2 and row["images_generated"] == 4
    assert row["seconds_per_concept"] >= row["finetune_seconds"] > 0 and row["unet_backward_samples"] > 0
    assert (tmp_path / "runs" / "sdxl-tiny" / "van_gogh" / "adapter.safetensors").is_file()


def test_a_model_of_an_unsupported_family_is_refused_with_the_supported_list(tmp_path):
    import json

    from ace_lightning.models.loading import ModelNotFoundError

    for part in ("unet", "text_encoder", "tokenizer", "vae", "scheduler"):
        (tmp_path / part).mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelNotFoundError, match="holds a FluxPipeline; supported families: "
                                                 "StableDiffusionPipeline, StableDiffusionXLPipeline"):
        load_components(str(tmp_path))
