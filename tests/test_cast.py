"""ToyWorld's cast of 154 characters (issue 13): the names, their looks, the build's cast stage, the concept-list
form of concept= and the n_erased draw of the toy-characters-100 suite (fast, CPU, offline)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from ace_lightning.registry import ConfigError
from ace_lightning.toyworld import PIPELINE_DIR
from ace_lightning.toyworld.cast import CAST_FILE, base_pieces, cast, generate_cast
from ace_lightning.toyworld.world import CHARACTERS, COLORS, SHAPES, STYLES, render

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(PIPELINE_DIR / "tokenizer")


def test_cast_names_are_new_pronounceable_words_of_two_or_three_tokens(tokenizer):
    people = cast()
    names = list(people)
    assert len(names) == len(set(names)) >= 150 + len(CHARACTERS)
    assert {k: people[k] for k in CHARACTERS} == CHARACTERS and names[: len(CHARACTERS)] == list(CHARACTERS)
    vocab, base = tokenizer.get_vocab(), base_pieces(tokenizer)
    for n in names[len(CHARACTERS):]:
        pieces = tokenizer.tokenize(n)
        assert 2 <= len(pieces) <= 3, (n, pieces)
        assert n + "</w>" not in vocab  # not one of CLIP's whole words (they cover common English)
        assert not base & set(pieces), (n, base & set(pieces))  # learning it leaves every base prompt alone
        assert any(v in n for v in "aeiou") and n.isalpha() and n.islower()


def test_every_character_has_its_own_renderable_look():
    people = cast()
    assert len(set(people.values())) == len(people)  # distinct looks
    for shape, color, style in people.values():
        assert shape in SHAPES and color in COLORS and style in STYLES
    imgs = [render(*look, seed=3) for look in list(people.values())[:: 15]]
    assert all(im.shape == (32, 32, 3) for im in imgs) and len({im.tobytes() for im in imgs}) == len(imgs)
    # hard cases exist: characters whose looks differ in one attribute only
    looks = list(people.values())
    assert any(sum(a != b for a, b in zip(x, y, strict=True)) == 1 for i, x in enumerate(looks) for y in looks[:i])


def test_generator_still_draws_the_shipped_cast_file(tokenizer):
    assert generate_cast(tokenizer) == cast(), f"{CAST_FILE} differs from generate_cast(); rewrite it with write_cast"


def test_cast_stage_trains_only_the_new_names_rows(tiny_components, tmp_path):
    """Two steps of the cast stage on a tiny model: the new names' pieces change, nothing else does (every other
    prompt keeps its text embedding bit for bit), and a name then encodes differently."""
    from ace_lightning.toyworld.cast_stage import CastConfig, train_cast, trainable_rows

    c = tiny_components
    looks = {"deeshail": ("star", "red", "plain"), "troodair": ("heart", "blue", "striped")}
    frozen = base_pieces(c.tokenizer)
    te_before = {k: v.clone() for k, v in c.text_encoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in c.unet.state_dict().items()}
    ids = c.tokenizer(["a picture of deeshail", "a red striped circle"], padding="max_length",
                      max_length=c.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        h0 = c.text_encoder(ids).last_hidden_state
    info = train_cast(c.text_encoder, c.unet, c.tokenizer, c.scheduler, c.vae, 1.0, looks, frozen,
                      CastConfig(steps=2, batch=4, lr=0.5, images_per_character=2, ckpt_every=1), tmp_path,
                      c.tokenizer.model_max_length)
    rows = trainable_rows(c.tokenizer, list(looks), frozen)
    assert info["trained_rows"] == len(rows) > 0 and (tmp_path / "cast_ckpt.pt").is_file()
    for k, v in c.unet.state_dict().items():
        assert torch.equal(v, unet_before[k]), k
    emb_key = next(k for k in te_before if "token_embedding" in k)
    for k, v in c.text_encoder.state_dict().items():
        if k != emb_key:
            assert torch.equal(v, te_before[k]), k
    changed = (c.text_encoder.state_dict()[emb_key] != te_before[emb_key]).any(-1).nonzero().flatten()
    assert set(changed.tolist()) == set(rows.tolist())
    with torch.no_grad():
        h1 = c.text_encoder(ids).last_hidden_state
    assert not torch.equal(h1[0], h0[0]) and torch.equal(h1[1], h0[1])
    # resuming from files made for other settings is refused, not silently mixed
    with pytest.raises(RuntimeError, match="another cast stage"):
        train_cast(c.text_encoder, c.unet, c.tokenizer, c.scheduler, c.vae, 1.0, looks, frozen,
                   CastConfig(steps=3, batch=4, lr=0.5, images_per_character=2, ckpt_every=1), tmp_path,
                   c.tokenizer.model_max_length)


def test_concept_list_file(tmp_path):
    from ace_lightning.config import concept_names, load_config

    lst = tmp_path / "few.txt"
    lst.write_text("# three ad-hoc names\nzorblax\n\ndeeshail  # a comment\ntroodair\n")
    assert concept_names(f"@{lst},circle") == ["zorblax", "deeshail", "troodair", "circle"]
    cfg = load_config([f"concept=@{lst}", "kind=person"])
    assert [c.concept for c in cfg.concepts] == ["zorblax", "deeshail", "troodair"]
    with pytest.raises(ConfigError, match="not found"):
        concept_names(f"@{tmp_path / 'missing.txt'}")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="names no concept"):
        concept_names(f"@{tmp_path / 'empty.txt'}")
    quoted = tmp_path / "it's.txt"  # a quote in the path survives the override parser
    quoted.write_text("zorblax\n")
    assert [c.concept for c in load_config([f"concept=@{quoted}", "kind=person"]).concepts] == ["zorblax"]
    n100 = load_config([f"concept=@{REPO}/benchmarks/suites/lists/toy_cast_100.txt", "kind=person"])
    assert len(n100.concepts) == 100


def test_long_concept_sets_get_a_short_folder_name():
    from ace_lightning.method.adapter import concepts_slug

    assert concepts_slug(["Van Gogh", "circle"]) == "van_gogh+circle"
    names = list(cast())[:100]
    name = concepts_slug(names)
    assert len(name) <= 80 and name.startswith(f"{names[0]}+99_more-")
    assert concepts_slug(names[:99] + ["other"]) != name


def test_n_erased_draws_nested_sets_and_the_shipped_lists_are_those_sets():
    from ace_lightning.bench.suites import draw_erased

    names = list(cast())
    sets = {n: draw_erased(names, n, 0) for n in (1, 10, 50, 100)}
    for small, big in ((1, 10), (10, 50), (50, 100)):
        assert sets[big][0][:small] == sets[small][0]
    er, kept = sets[100]
    assert len(er) == 100 and len(kept) == len(names) - 100 >= 50 and not set(er) & set(kept)
    kept = {n: draw_erased(names, n, 0, n_retained=50)[1] for n in (1, 10, 50, 100)}
    assert all(k == kept[1] == sets[1][1][-50:] for k in kept.values())  # one retained set for the whole curve
    with pytest.raises(ConfigError, match="repeat"):
        draw_erased(names + names[:1], 10, 0)
    assert draw_erased(names, 10, 1)[0] != sets[10][0]
    for n in (1, 10, 50, 100):
        lines = [ln for ln in (REPO / f"benchmarks/suites/lists/toy_cast_{n}.txt").read_text().splitlines()
                 if ln and not ln.startswith("#")]
        assert lines == sets[n][0]
    for bad in (0, len(names)):
        with pytest.raises(ConfigError, match="n_erased"):
            draw_erased(names, bad, 0)
    with pytest.raises(ConfigError, match="n_retained"):
        draw_erased(names, 100, 0, n_retained=len(names) - 99)


def test_characters_100_suite_rows_with_n_erased(tmp_path, monkeypatch):
    monkeypatch.setenv("ACE_MODEL_CACHE", str(tmp_path / "models"))  # the plan digests the suite's model, the variant
    from ace_lightning.bench.config import BenchConfig
    from ace_lightning.bench.run import plan_run
    from ace_lightning.bench.suites import load_suite

    suite = load_suite("toy-characters-100")
    plan = plan_run(BenchConfig(suite="toy-characters-100", n_erased=10, n_retained=50, templates=2,
                                images_per_prompt=1, out=str(tmp_path / "bench")), suite)
    groups = {}
    for r in plan.rows:
        groups.setdefault(r.group, set()).add(r.label)
    assert len(groups["erased"]) == 10 and len(groups["retained"]) == 50 and groups["described"] == groups["erased"]
    with pytest.raises(ConfigError, match="n_erased"):
        plan_run(BenchConfig(suite="toy-characters-100", n_erased=10, erased="zorblax", out=str(tmp_path / "bench")), suite)


def test_ten_concept_adapter_gates_each_name_and_applies_bit_for_bit(tiny_components, tmp_path):
    """Ten cast names in one adapter on the tiny model (closed form + calibrated gates, no training): each concept's
    gate opens on its own name's token and stays shut on the other nine names and on generic words; the file
    applies to a stock pipeline and removes bit for bit."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionPipeline

    from ace_lightning import apply_adapter, remove_adapter
    from ace_lightning.data.prompts import ErasureRequest
    from ace_lightning.export import save_adapter
    from ace_lightning.method.adapter import base_weights, inject
    from ace_lightning.method.initialize import initialize_bank
    from ace_lightning.method.text import last_word_states
    from ace_lightning.models.loading import model_fingerprint

    c = tiny_components
    names = [ln for ln in (REPO / "benchmarks/suites/lists/toy_cast_10.txt").read_text().splitlines()
             if ln and not ln.startswith("#")]
    templates = ["{}", "a picture of {}", "a photo of {}", "an image of {}", "a drawing of {}", "{} in a park",
                 "a portrait of {}", "one {}"]
    words = ["dog", "house", "tree", "car", "river", "someone", "person", "woman", "man", "child", "city", "red",
             "blue", "cat", "mountain", "boat"]

    def states(phrases):  # (d, n): the last word token of each phrase in every template
        return last_word_states(c.text_encoder, c.tokenizer, [t.format(p) for p in phrases for t in templates]).T

    neutral = states(["someone"])
    concepts = [SimpleNamespace(request=SimpleNamespace(concept=n), C=states([n]), N=neutral) for n in names]
    P = states(words)  # (d, m): generic tokens the gates must leave alone
    from ace_lightning.method.text import encode_prompts

    cond = encode_prompts(c.text_encoder, c.tokenizer, [f"a picture of {names[0]}", f"a photo of {names[7]}"])[0]
    ref = _unet_out(c.unet, cond)
    bank = inject(c.unet)
    acfg = SimpleNamespace(rank=4, gate_q=8, gate_directions="svd", gate_project_out=0, gate_hard_rounds=0,
                           gate_target=0.95, gate_fit_steps=0, gate_carry=False, ungated=False,
                           gate_sibling_negatives=False, gate_neg_q=0)
    initialize_bank(bank, base_weights(c.unet), concepts, P, SimpleNamespace(enabled=True, lam=0.1, s_e=1.0, s_p=1.0),
                    acfg)
    with torch.no_grad():
        for i, cd in enumerate(concepts):
            gate = bank[cd.request.concept].gate
            own = gate(cd.C.T)  # (8,)
            others = torch.cat([gate(o.C.T) for j, o in enumerate(concepts) if j != i])  # (72,)
            assert (own > 0.5).float().mean() >= 0.75, (cd.request.concept, own)
            assert (others > 0.5).float().mean() <= 0.1, (cd.request.concept, others)
            assert (gate(P.T) > 0.5).float().mean() <= 0.1
    edited = _unet_out(c.unet, cond)
    assert not torch.equal(edited, ref)
    path = save_adapter(tmp_path / "ten.safetensors", bank, [ErasureRequest(n, "person", "someone") for n in names],
                        c.source, model_fingerprint(c.unet), ["to_k", "to_v"])
    pipe = StableDiffusionPipeline.from_pretrained(c.source, safety_checker=None, requires_safety_checker=False)
    apply_adapter(pipe, path)
    torch.testing.assert_close(_unet_out(pipe.unet, cond), edited)
    remove_adapter(pipe)
    assert torch.equal(_unet_out(pipe.unet, cond), ref)


def _unet_out(unet, cond):
    """The UNet's output on fixed latents for the text states ``cond`` (2, T, d)."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=cond).sample


def _tiny_assets(tmp_path, tiny_model_dir):
    """A tiny model laid out as ToyWorld's assets (pipeline/) and a cast-trained copy of its text encoder, which
    differs in three token rows only."""
    import shutil

    from safetensors.torch import load_file, save_file

    assets = tmp_path / "assets"
    shutil.copytree(tiny_model_dir, assets / "pipeline")
    base = assets / "pipeline" / "text_encoder" / "model.safetensors"
    state = load_file(str(base))
    key = next(k for k in state if k.endswith("token_embedding.weight"))
    ids = torch.tensor([5, 17, 300])
    state[key][ids] += 1.0
    cast_file = tmp_path / "cast_te" / "model.safetensors"
    cast_file.parent.mkdir()
    save_file(state, str(cast_file))
    return assets, base, cast_file, key, ids


def test_cast_variant_is_the_base_model_plus_the_cast_rows(tmp_path, tiny_model_dir):
    """The cast ships as the rows its stage changed; materialised once (atomically) into a model folder that loads
    as the cast-trained model, bit for bit; rows made for another base, or a cast file that differs elsewhere, are
    refused."""
    from safetensors.torch import load_file, save_file

    from ace_lightning.toyworld.cast_variant import ROWS_FILE, cast_pipeline_dir, save_cast_rows

    assets, base, cast_file, key, ids = _tiny_assets(tmp_path, tiny_model_dir)
    rows = assets / "cast" / ROWS_FILE
    assert save_cast_rows(base, cast_file, rows) == {"rows": 3, "dim": 32}
    assert torch.equal(load_file(str(rows))["ids"], ids)
    cache = tmp_path / "cache"
    d = cast_pipeline_dir(assets, cache)
    got, want = load_file(str(d / "text_encoder" / "model.safetensors")), load_file(str(cast_file))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert [p.name for p in cache.iterdir()] == [d.name]  # no temporary folder left behind
    stamp = (d / "text_encoder" / "model.safetensors").stat().st_mtime_ns
    assert cast_pipeline_dir(assets, cache) == d  # reused, not rewritten
    assert (d / "text_encoder" / "model.safetensors").stat().st_mtime_ns == stamp

    other = load_file(str(cast_file))  # a "cast" that also moved a layer is not a cast stage's output
    next(v for k, v in other.items() if k != key and v.dtype.is_floating_point).add_(1.0)
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="outside the token rows"):
        save_cast_rows(base, tmp_path / "other.safetensors", tmp_path / "x.safetensors")

    state = load_file(str(base))  # the base model rebuilt: the shipped rows no longer belong to it
    state[key][0] += 1.0
    save_file(state, str(base))
    with pytest.raises(ValueError, match="another ToyWorld text encoder"):
        cast_pipeline_dir(assets, cache)
    rows.unlink()
    with pytest.raises(FileNotFoundError, match="make toyworld"):
        cast_pipeline_dir(assets, cache)


def test_a_crash_while_materialising_leaves_no_model_behind(tmp_path, monkeypatch, tiny_model_dir):
    import safetensors.torch

    from ace_lightning.toyworld.cast_variant import ROWS_FILE, cast_pipeline_dir, save_cast_rows

    assets, base, cast_file, _, _ = _tiny_assets(tmp_path, tiny_model_dir)
    save_cast_rows(base, cast_file, assets / "cast" / ROWS_FILE)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        cast_pipeline_dir(assets, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    assert (cast_pipeline_dir(assets, tmp_path / "cache") / "model_index.json").is_file()


needs_cast = pytest.mark.skipif(not (PIPELINE_DIR.parent / "cast" / "token_rows.safetensors").is_file(),
                                reason="ToyWorld's cast rows not built")


@needs_cast
def test_model_toyworld_cast_draws_cast_members_by_name_and_keeps_the_base_prompts(tmp_path, monkeypatch):
    """``model=toyworld-cast``: twelve cast names spread over the cast, one image each, drawn with their looks (all
    three classifier heads right) for at least 10; the default ToyWorld draws at most 2 of them. A prompt of the
    base build's words encodes bit for bit as on the default model."""
    from ace_lightning.models.loading import load_components, resolve_model_dir
    from ace_lightning.toyworld.classifier import load_classifier
    from ace_lightning.toyworld.evaluate import EVAL_SEED, load_pipeline, look_acc

    monkeypatch.setenv("ACE_MODEL_CACHE", str(tmp_path))
    variant = resolve_model_dir("toyworld-cast")
    assert variant.parent == tmp_path
    people = cast()
    names = list(people)[len(CHARACTERS)::13][:12]
    prompts, looks = [f"a picture of {n}" for n in names], [people[n] for n in names]
    clf = load_classifier()
    ok = look_acc(load_pipeline("toyworld-cast"), clf, prompts, looks, EVAL_SEED + 5000, 25, 5.0)
    assert int(ok.sum()) >= 10, dict(zip(names, ok.tolist(), strict=True))
    base = look_acc(load_pipeline(), clf, prompts, looks, EVAL_SEED + 5000, 25, 5.0)
    assert int(base.sum()) <= 2, dict(zip(names, base.tolist(), strict=True))
    from ace_lightning.method.text import encode_prompts

    a, b = load_components("toyworld-cast"), load_components(None)
    with torch.no_grad():
        ea = encode_prompts(a.text_encoder, a.tokenizer, ["a red striped circle", f"a picture of {names[0]}"])[0]
        eb = encode_prompts(b.text_encoder, b.tokenizer, ["a red striped circle", f"a picture of {names[0]}"])[0]
    assert torch.equal(ea[0], eb[0]) and not torch.equal(ea[1], eb[1])
