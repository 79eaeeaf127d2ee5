"""Stage 2 on a tiny model: only adapter tensors change, L_erase falls, resume, determinism."""

import json
import re

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from ace_lightning.config import EXPERIMENTS_DIR, load_config
from ace_lightning.train import run

DOG = "concepts=[{concept: dog, kind: object, neutral: animal, synonyms: [puppy]}]"


CACHE = {}


def tiny_cfg(model_dir, out, *extra):
    return load_config(tiny_args(model_dir, out, *extra))


def tiny_args(model_dir, out, *extra) -> list[str]:
    """Command-line overrides of a quick run on the tiny model."""
    # one latent/neighbour cache for the session: it is keyed by model fingerprint, prompt, seed and sampler
    if "dir" not in CACHE:  # made once (a setdefault would make, and leave behind, a new directory every call)
        import atexit
        import shutil
        import tempfile

        CACHE["dir"] = tempfile.mkdtemp(prefix="ace_cache_")
        atexit.register(shutil.rmtree, CACHE["dir"], True)
    cache = CACHE["dir"]
    return [
        DOG, f"model.path={model_dir}", f"output_dir={out}", "logger.wandb=false", "grid.enabled=false",
        "trainer.enable_progress_bar=false", "data.latents_per_concept=4", "data.latents_preserve=4",
        "data.prompts_per_concept=8", "data.preserve_prompts=8", "data.neighbours_vocab=300", "data.vocab_preserve=300", "data.vocab_heldout=20", "sampler.steps=3",
        f"data.cache_dir={cache}", "adv.warmup=4", "adv.every=4", "adv.steps=2", *extra,
    ]


class LossLog(L.Callback):
    def __init__(self):
        self.erase = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.erase.append(float(trainer.callback_metrics["train/loss_erase"]))


def changed_tensors(comps, fresh) -> list[str]:
    """Names of the UNet / text-encoder / VAE tensors of ``comps`` (in memory) that differ from ``fresh``."""
    from ace_lightning.method.adapter import bank_of

    assert bank_of(comps.unet) is None, "remove the adapter first"
    out = []
    for part in ("unet", "text_encoder", "vae"):
        a, b = getattr(comps, part).state_dict(), getattr(fresh, part).state_dict()
        assert a.keys() == b.keys(), part
        out += [f"{part}.{k}" for k in a if not torch.equal(a[k], b[k])]
    return out


def test_only_adapter_changes_and_erase_loss_falls(tiny_model_dir, tmp_path, monkeypatch):
    import ace_lightning.train as T
    from ace_lightning.method.adapter import remove
    from ace_lightning.models.loading import load_components

    log = LossLog()
    orig = L.Trainer.__init__

    def with_log(self, *a, **kw):
        kw["callbacks"] = [*kw.get("callbacks", []), log]
        orig(self, *a, **kw)

    monkeypatch.setattr(L.Trainer, "__init__", with_log)
    used = []  # the very components the run trained with
    load = T.load_components
    monkeypatch.setattr(T, "load_components", lambda *a, **kw: used.append(load(*a, **kw)) or used[-1])
    # B = 0 start (no closed form): L_erase starts at ||eps(tgt) - eps(neu)||^2 and must be trained down
    cfg = tiny_cfg(tiny_model_dir, tmp_path, "trainer.max_steps=30", "closed_form.enabled=false", "optim.lr=3e-3",
                   "adv.enabled=false")
    metrics = run(cfg)
    assert metrics["train/global_step"] == 30
    first, last = sum(log.erase[:5]) / 5, sum(log.erase[-5:]) / 5
    assert last < 0.7 * first, (first, last)

    # frozen model untouched: every UNet / text-encoder / VAE tensor *in memory after training* equals a fresh load
    (trained,) = used
    remove(trained.unet)
    fresh = load_components(str(tiny_model_dir))
    assert changed_tensors(trained, fresh) == []
    # ... and the check can fail: one perturbed frozen weight is caught
    w = next(p for n, p in trained.vae.named_parameters() if n.endswith("weight"))
    with torch.no_grad():
        w.view(-1)[0] += 1e-6
    assert len(changed_tensors(trained, fresh)) == 1

    adapter = load_file(tmp_path / "dog" / "adapter.safetensors")
    assert any(k.endswith(".A") for k in adapter) and all("base_layer" not in k for k in adapter)
    # and B moved away from its zero start (only adapter tensors trained)
    assert max(v.abs().max() for k, v in adapter.items() if ".B." in k) > 0
    report = json.loads((tmp_path / "dog" / "prompts.json").read_text())  # what exactly was erased
    (dog,) = report["concepts"]
    assert dog["concept"] == "dog" and len(dog["prompts"]) == 8 and {"puppy", "dog"} <= {p["phrase"] for p in dog["prompts"]}


def test_resume_is_exact_and_runs_are_deterministic(tiny_model_dir, tmp_path):
    """6 steps + resume 3 gives the *identical* adapter to 9 steps straight, with adversarial augmentation on
    (attacks at steps 4 and 8: the pool built at step 4 is used on both sides of the checkpoint)."""
    a = run(tiny_cfg(tiny_model_dir, tmp_path / "a", "trainer.max_steps=6", "trainer.checkpoint_every=3"))
    assert (tmp_path / "a" / "dog" / "checkpoints" / "last.ckpt").is_file() and a["train/global_step"] == 6
    ckpt = torch.load(tmp_path / "a" / "dog" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6 and len(ckpt["ace_adv_pool"]) > 0
    assert all(k.startswith("bank.") for k in ckpt["state_dict"])  # checkpoints hold only the adapter
    t6 = load_file(tmp_path / "a" / "dog" / "adapter.safetensors")
    resumed = run(tiny_cfg(tiny_model_dir, tmp_path / "a", "trainer.max_steps=9", "ckpt_path=last"))
    assert resumed["train/global_step"] == 9
    straight = run(tiny_cfg(tiny_model_dir, tmp_path / "s", "trainer.max_steps=9"))
    assert straight["train/global_step"] == 9
    ta, ts = (load_file(p / "dog" / "adapter.safetensors") for p in (tmp_path / "a", tmp_path / "s"))
    assert ta.keys() == ts.keys()
    diff = max(float((ta[k] - ts[k]).abs().max()) for k in ta)
    assert diff == 0.0, diff  # old code (pool not checkpointed): 6.7e-4
    assert any(not torch.equal(ta[k], t6[k]) for k in ta)  # and the resumed run did train 3 more steps

    c = run(tiny_cfg(tiny_model_dir, tmp_path / "c", "trainer.max_steps=6", "seed=1"))
    tc = load_file(tmp_path / "c" / "dog" / "adapter.safetensors")
    assert c["train/global_step"] == 6 and any(not torch.equal(t6[k], tc[k]) for k in t6)  # another seed
    meta = json.loads((tmp_path / "c" / "dog" / "metrics.json").read_text())
    assert meta["stats"]["dog"]["rank"] >= 1 and meta["method"] == "ace"


def test_closed_form_only_run(tiny_model_dir, tmp_path):
    m = run(tiny_cfg(tiny_model_dir, tmp_path, "trainer.max_steps=0"))
    assert m["train/global_step"] == 0 and (tmp_path / "dog" / "adapter.safetensors").is_file()


def test_missing_resume_checkpoint_is_clear(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="resume"):
        run(tiny_cfg(tiny_model_dir, tmp_path, "ckpt_path=last"))


def test_two_concepts_one_adapter_grid_and_offline_wandb(tiny_model_dir, tmp_path, monkeypatch):
    """Several concepts in one run; each concept's adapter can be removed without touching the other."""
    from ace_lightning.export import load_into, read_adapter
    from ace_lightning.models.loading import load_components

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny_cfg(tiny_model_dir, tmp_path, "trainer.max_steps=4", "logger.wandb=true", "grid.enabled=true",
                   "grid.seeds=[0,1]", "name=two",
                   "concepts=[{concept: dog, kind: object, neutral: animal}, {concept: Van Gogh, kind: style, neutral: art}]")
    run(cfg)
    run_dir = tmp_path / "two"
    _, meta = read_adapter(run_dir / "adapter.safetensors")
    assert [c["concept"] for c in meta["concepts"]] == ["dog", "Van Gogh"]
    assert (run_dir / "grid.png").stat().st_size > 1000
    assert list((run_dir / "wandb").glob("offline-run-*"))

    comps = load_components(str(tiny_model_dir))
    bank = load_into(comps.unet, run_dir / "adapter.safetensors")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    c = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    out = lambda u: u(x, torch.tensor([400]), encoder_hidden_states=c).sample  # noqa: E731
    with torch.no_grad():
        both = out(comps.unet)
        bank.remove_concept("Van Gogh")
        dog_only = out(comps.unet)
        # reference: the same file with Van Gogh's B factors zeroed (its delta is exactly 0), dog's untouched
        ref = load_components(str(tiny_model_dir))
        ref_bank = load_into(ref.unet, run_dir / "adapter.safetensors")
        for B in ref_bank["Van Gogh"].B.values():
            B.zero_()
        # removing a concept leaves the other's edit (to rounding: every concept is one stacked product, whose
        # summation order changes with the number of concepts)
        assert torch.allclose(dog_only, out(ref.unet), rtol=0, atol=1e-6)
        with ref_bank.disabled():
            base = out(ref.unet)
    assert not torch.equal(both, dog_only) and not torch.equal(dog_only, base)


def test_bfloat16_training(tiny_model_dir, tmp_path):
    """model.dtype=bfloat16 trains (adapter in float32) and the adapter applies to the float32 model too."""
    from ace_lightning.export import load_into, read_adapter
    from ace_lightning.models.loading import load_components

    m = run(tiny_cfg(tiny_model_dir, tmp_path, "trainer.max_steps=3", "model.dtype=bfloat16", "adv.warmup=1",
                     "adv.every=1"))
    assert m["train/global_step"] == 3 and all(v == v for k, v in m.items() if k.startswith("train/loss"))
    tensors, meta = read_adapter(tmp_path / "dog" / "adapter.safetensors")
    assert meta["base_dtype"] == "bfloat16" and all(t.dtype == torch.float32 and t.isfinite().all() for t in tensors.values())
    load_into(load_components(str(tiny_model_dir)).unet, tmp_path / "dog" / "adapter.safetensors")  # fp32: accepted


def test_sd2_layout_trains(tiny_v2_model_dir, tmp_path):
    """SD-2.x differences ('!' padding, v-prediction, other token length) need no special casing."""
    from ace_lightning.models.loading import load_components

    comps = load_components(str(tiny_v2_model_dir))
    assert comps.tokenizer.pad_token == "!" and comps.tokenizer.model_max_length == 20
    assert comps.scheduler.config.prediction_type == "v_prediction"
    m = run(tiny_cfg(tiny_v2_model_dir, tmp_path, "trainer.max_steps=3"))
    assert m["train/global_step"] == 3 and m["train/gate_target"] > 0.5


RECIPES = sorted(str(p.relative_to(EXPERIMENTS_DIR).with_suffix("")) for p in EXPERIMENTS_DIR.rglob("*.yaml")
                 if p.name != "base.yaml" and p.parent.name not in ("concepts", "sweeps"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_smoke_runs(recipe, tiny_model_dir, tmp_path):
    """Each recipe in experiments/ runs (1 step, tiny model) and its values reach the run's config.yaml."""
    from omegaconf import OmegaConf

    from ace_lightning.export import read_adapter

    recipe_cfg = OmegaConf.load(EXPERIMENTS_DIR / f"{recipe}.yaml")
    steps = min(1, int(OmegaConf.select(recipe_cfg, "trainer.max_steps", default=1)))
    how = f"method={recipe.removeprefix('methods/')}" if recipe.startswith("methods/") else f"experiment={recipe}"
    m = run(tiny_cfg(tiny_model_dir, tmp_path, how, f"trainer.max_steps={steps}", "trainer.steps_per_concept=0",
                     "adv.warmup=0", "adv.every=1", "grid.seeds=[0]"))
    saved = OmegaConf.load(tmp_path / "dog" / "config.yaml")
    overridden = {"trainer.max_steps", "trainer.steps_per_concept", "grid.enabled", "data.vocab_preserve", "data.vocab_heldout",  # this test / tiny_cfg
                  "data.latents_preserve", "data.latents_per_concept", "data.preserve_prompts", "adv.steps",
                  "adv.warmup", "adv.every"}
    for key in [k for k in _leaves(recipe_cfg) if k not in overridden]:
        assert OmegaConf.select(saved, key) == OmegaConf.select(recipe_cfg, key), key
    assert m["train/global_step"] == steps
    _, meta = read_adapter(tmp_path / "dog" / "adapter.safetensors")
    if meta["kind"] == "delta":  # dense-delta methods (ESD, AdvUnlearn, MACE) have no gate
        assert recipe.startswith(("methods/esd", "methods/advunlearn", "methods/mace")) and meta["method"] == saved.method
    else:
        assert meta["concepts"][0]["gated"] == (not OmegaConf.select(saved, "adapter.ungated"))


def _leaves(cfg, prefix=""):
    from omegaconf import DictConfig

    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, DictConfig):
            yield from _leaves(v, key + ".")
        else:
            yield key


def test_long_gate_prompts_reach_the_gate_and_carry_is_saved(tiny_model_dir, tmp_path):
    """``data.gate_long_prompts`` adds long prompts to the gate's fit (its directions change) and
    ``adapter.gate_carry`` is written into the adapter file."""
    from ace_lightning.export import read_adapter

    gate = ["trainer.max_steps=0", "data.gate_prompts=8", "data.gate_hard_words=4", "data.gate_hard_contexts=2",
            "adapter.gate_fit_steps=20"]
    run(tiny_cfg(tiny_model_dir, tmp_path / "a", *gate))
    run(tiny_cfg(tiny_model_dir, tmp_path / "b", *gate, "data.gate_long_prompts=64", "adapter.gate_carry=true"))
    (ta, ma), (tb, mb) = (read_adapter(tmp_path / x / "dog" / "adapter.safetensors") for x in "ab")
    q_keys = [k for k in ta if k.endswith(".Q")]
    assert q_keys and any(not torch.equal(ta[k], tb[k]) for k in q_keys)
    assert [c["carry"] for c in ma["concepts"]] == [False] and [c["carry"] for c in mb["concepts"]] == [True]


def _gate_values(state: dict, key: str, X: torch.Tensor) -> torch.Tensor:
    """Gate of concept ``key`` in a checkpoint's state dict on tokens X (n, d) -> (n,)."""
    Q, gamma, tau = (state[f"bank.concepts.{key}.{n}"] for n in ("Q", "gamma", "tau"))
    Xh = X / X.norm(dim=-1, keepdim=True)
    return torch.sigmoid(gamma * ((Xh @ Q).pow(2).sum(-1) - tau))


def test_adversarial_gate_refit_opens_the_gate_on_what_the_inner_attack_found(tiny_model_dir, tmp_path):
    """``method=ace_adv_gate``: the inner attack's tokens join the gate's positives and the gate is refitted. The
    same run without refits (same seed, same initial gate) leaves its gate shut on those tokens; the refitted gate
    opens on them. The pool is checkpointed."""
    how = ["method=ace_adv_gate", "trainer.max_steps=6", "adv.warmup=0", "adv.every=2", "adv.steps=3"]
    run(tiny_cfg(tiny_model_dir, tmp_path / "refit", *how))
    run(tiny_cfg(tiny_model_dir, tmp_path / "plain", *how, "adv.gate_refit_steps=0"))
    refit, plain = (torch.load(tmp_path / p / "dog" / "checkpoints" / "last.ckpt", weights_only=False)
                    for p in ("refit", "plain"))
    pool = refit["ace_adv_gate_pos"]["dog"]  # (n, d): 3 attacks x 2 rows x (n_adv slots + 1)
    assert pool.shape[0] == 3 * 2 * (load_config(["concept=dog", "method=ace_adv_gate"]).adv.n_adv + 1)
    assert plain["ace_adv_gate_pos"] == {}
    g_refit, g_plain = _gate_values(refit["state_dict"], "dog", pool), _gate_values(plain["state_dict"], "dog", pool)
    assert g_refit.mean() > 0.8 and g_refit.mean() > g_plain.mean() + 0.3, (g_refit.mean(), g_plain.mean())


def test_name_like_negatives_and_steps_per_concept(tiny_model_dir, tmp_path):
    """``data.gate_hard_pseudo``: each gate's hardest non-words join its hard negatives (recorded with its hard words
    in prompts.json) and the gates' false-fire rate on held-out non-words is reported; ``trainer.steps_per_concept``
    scales the step budget with the number of concepts (and config.yaml records the steps run)."""
    import json

    from omegaconf import OmegaConf

    two = "concepts=[{concept: dog, kind: object, neutral: animal}, {concept: cat, kind: object, neutral: animal}]"
    m = run(tiny_cfg(tiny_model_dir, tmp_path, two, "trainer.max_steps=1", "trainer.steps_per_concept=2",
                     "data.gate_hard_words=2", "data.gate_hard_contexts=1", "data.gate_hard_pseudo=3",
                     "data.gate_pseudo_pool=1000", "adapter.gate_fit_steps=5", "adv.enabled=false"))
    run_dir = next(p for p in tmp_path.iterdir() if (p / "prompts.json").is_file())
    assert m["train/global_step"] == 4 and OmegaConf.load(run_dir / "config.yaml").trainer.max_steps == 4
    report = json.loads((run_dir / "prompts.json").read_text())
    for c in report["concepts"]:
        vocab_words, pseudo = c["gate_hard_words"][:2], c["gate_hard_words"][2:]
        assert len(vocab_words) == 2 and len(pseudo) == 3 and not set(pseudo) & set(vocab_words), c["gate_hard_words"]
    assert 0.0 <= m["gate/false_fire_names_any"] <= 1.0 and "gate/false_fire_names/dog" in m


def test_name_like_preserve_prompts_are_the_fitted_gates_nearest_nonwords(tiny_model_dir, tmp_path):
    """``data.preserve_pseudo``: per concept, the k non-words its *fitted* gate opens to most (none sharing a piece
    with an erased phrase) become preserve prompts of the fine-tuning (recorded in prompts.json)."""
    import json

    from ace_lightning.data.prompts import pseudo_words
    from ace_lightning.method.text import last_word_states
    from ace_lightning.models.loading import load_components

    two = "concepts=[{concept: dog, kind: object, neutral: animal}, {concept: cat, kind: object, neutral: animal}]"
    run(tiny_cfg(tiny_model_dir, tmp_path, two, "trainer.max_steps=1", "data.preserve_pseudo=3",
                 "data.preserve_hard_words=2", "data.gate_hard_words=4", "data.gate_pseudo_pool=1000",
                 "adapter.gate_fit_steps=5", "adv.enabled=false", "seed=0"))
    run_dir = next(p for p in tmp_path.iterdir() if (p / "prompts.json").is_file())
    report = json.loads((run_dir / "prompts.json").read_text())
    extra = report["extra_preserve_prompts"]  # per concept: 3 non-words, then 2 prompts of its hard words
    assert len(extra) == 10, extra
    prompts = extra[:3] + extra[5:8]
    for c, combos in zip(report["concepts"], (extra[3:5], extra[8:10])):
        near = c["gate_hard_words"][:4]
        assert all(any(f" {w}" in f" {p}" for w in near) for p in combos), (near, combos)
    comps = load_components(str(tiny_model_dir))
    pool = pseudo_words(comps.tokenizer, 1000, 0)[:-400]  # the DataModule's pool without its held-out 400
    allowed = [w for w, pieces in pool if not {"dog", "cat", "animal"} & set(pieces)]
    X = last_word_states(comps.text_encoder, comps.tokenizer, [f"a {w}" for w in allowed])  # (n, d)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for i, key in enumerate(("dog", "cat")):
        top = [allowed[j] for j in _gate_values(state, key, X).topk(3).indices.tolist()]
        chosen = prompts[3 * i : 3 * i + 3]
        assert all(any(p.endswith(w) or f" {w} " in f" {p} " for p in chosen) for w in top), (key, top, chosen)


def test_the_dataset_draws_half_its_preserve_rows_from_the_name_like_prompts():
    """With name-like preserve prompts, about half the preserve rows carry one of them (on a preserve latent);
    without them every row is a generic preserve prompt."""
    from types import SimpleNamespace

    from ace_lightning.data.datamodule import ErasureDataModule, ErasureDataset

    T, d = 5, 4
    cd = SimpleNamespace(ids=torch.zeros(2, T, dtype=torch.long), span=torch.zeros(2, 2, dtype=torch.long),
                         emb=torch.zeros(2, T, d), emb_neu=torch.zeros(2, T, d), target_mask=torch.ones(2, T, dtype=torch.bool),
                         latents=torch.zeros(3, 1, 2, 2), prompts=["x", "y"])
    dm = SimpleNamespace(seed=0, concepts=[cd], preserve_latents=torch.randn(4, 1, 2, 2), preserve_emb=torch.zeros(4, T, d),
                         preserve_mask=torch.ones(4, T, dtype=torch.bool), preserve_ids=torch.zeros(4, T, dtype=torch.long),
                         timesteps=lambda n, generator, num_train_timesteps: torch.zeros(n, dtype=torch.long),
                         num_train_timesteps=1000, extra_preserve=None,
                         EXTRA_PRESERVE_SHARE=ErasureDataModule.EXTRA_PRESERVE_SHARE)
    plain = [ErasureDataset(dm, 400)[i]["emb_p"].sum() for i in range(400)]
    assert all(float(v) == 0.0 for v in plain)
    dm.extra_preserve = (torch.ones(3, T, d), torch.ones(3, T, dtype=torch.bool), torch.ones(3, T, dtype=torch.long))
    share = sum(float(ErasureDataset(dm, 400)[i]["emb_p"].sum()) > 0 for i in range(400)) / 400
    assert 0.4 < share < 0.6, share


def _fit_dog_gate_with_and_without(tiny_model_dir, tmp_path, option: str) -> dict:
    """Stage 1 for 'dog' (4 hard words, 60 fit steps) with ``option`` in ``tmp_path/with`` and without it in
    ``tmp_path/without`` (same seed); returns the first run's prompts.json entry for the concept."""
    import json

    how = ["trainer.max_steps=1", "data.gate_hard_words=4", "data.gate_hard_contexts=8", "adapter.gate_fit_steps=60",
           "adv.enabled=false"]
    run(tiny_cfg(tiny_model_dir, tmp_path / "with", *how, option))
    run(tiny_cfg(tiny_model_dir, tmp_path / "without", *how))
    return json.loads((tmp_path / "with" / "dog" / "prompts.json").read_text())["concepts"][0]


def test_hard_word_modifiers_open_the_gate_on_the_concept_after_its_hard_words(tiny_model_dir, tmp_path):
    """``data.gate_hard_modifiers``: the concept after each of its first hard words ("a <hard word> dog") joins its
    gate's positives (prompts.json lists them); the fitted gate then opens on the concept's token there, where the
    same fit without them (same seed, same hard words as negatives) opens less."""

    from ace_lightning.method.text import last_word_states
    from ace_lightning.models.loading import load_components

    report = _fit_dog_gate_with_and_without(tiny_model_dir, tmp_path, "data.gate_hard_modifiers=4")
    prompts, words = report["gate_hard_positives"], report["gate_hard_words"][:4]
    phrases = ["dog", *report["synonyms"]]
    hits = [(p, f"{w} {ph}") for p in prompts for w in words for ph in phrases if f" {w} {ph}" in f" {p} "]
    assert len(prompts) == 4 and {h.split()[0] for _, h in hits} == set(words), (words, prompts)
    comps = load_components(str(tiny_model_dir))
    ends = [p[: p.index(h) + len(h)] for p, h in hits]  # up to the concept: its state is the last word's
    X = last_word_states(comps.text_encoder, comps.tokenizer, ends)  # (n, d)
    g = {k: _gate_values(torch.load(tmp_path / k / "dog" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"],
                         "dog", X) for k in ("with", "without")}
    assert g["with"].mean() > 0.9 and g["with"].mean() > g["without"].mean() + 0.05, (g["with"], g["without"])


def test_shared_hard_word_contexts_are_encoded_once_per_word_and_evicted_oldest_first(tiny_components, monkeypatch):
    """``data.gate_hard_shared_contexts``: a hard word's contexts are drawn per (kind, word) and encoded once per run;
    a second concept with that word gets the same columns without encoding it again, and past ``HARD_CACHE_BYTES``
    the oldest words are dropped (and encoded again when asked)."""
    from ace_lightning.config import load_config
    from ace_lightning.data.datamodule import ErasureDataModule
    from ace_lightning.data.prompts import ErasureRequest, family
    from ace_lightning.models.sampling import SamplerSettings

    cfg = load_config(["concept=dog", "data.gate_hard_contexts=4"])
    dm = ErasureDataModule(tiny_components, [ErasureRequest("dog", "object", "animal")], cfg.data, SamplerSettings(),
                           0, 1, "test")
    dm.fam = family(cfg.data.template_family, ["red", "blue", "tree", "house"], 0)
    encoded = []
    rows = dm._token_rows
    monkeypatch.setattr(dm, "_token_rows", lambda prompts: encoded.append(len(prompts)) or rows(prompts))
    first = dm._word_contexts("object", ["red", "blue"])  # (d, n)
    second = dm._word_contexts("object", ["blue", "tree"])
    assert encoded == [8, 4]  # 4 contexts a word; 'blue' not encoded again
    blue = dm._hard_cache[("object", "blue")]
    red = dm._hard_cache[("object", "red")]
    assert torch.equal(first, torch.cat([red, blue], 1)) and torch.equal(second[:, : blue.shape[1]], blue)
    assert dm._hard_cache_bytes == sum(x.numel() * x.element_size() for x in dm._hard_cache.values())
    monkeypatch.setattr(dm, "HARD_CACHE_BYTES", 2 * blue.numel() * blue.element_size())
    dm._word_contexts("object", ["house"])  # over the cap: the oldest ('red', then 'blue') go
    assert ("object", "red") not in dm._hard_cache and ("object", "house") in dm._hard_cache
    assert dm._hard_cache_bytes == sum(x.numel() * x.element_size() for x in dm._hard_cache.values())
    dm._word_contexts("object", ["red"])
    assert encoded[-1] == 4  # encoded again once dropped


def test_hard_word_combinations_shut_the_gate_on_the_words_nearest_its_concept(tiny_model_dir, tmp_path):
    """``data.gate_hard_combos``: prompts of 2-3 of a concept's first hard words in its templates join its gate's
    negatives (prompts.json lists them, each made of those words); on held-out combinations of the same words the
    fitted gate then opens less on every ordered combination of those words than the same fit without them (same
    seed, same hard words)."""
    import itertools
    import json

    from ace_lightning.method.text import last_word_states
    from ace_lightning.models.loading import load_components

    report = _fit_dog_gate_with_and_without(tiny_model_dir, tmp_path, "data.gate_hard_combos=24")
    combos, words = report["gate_hard_combos"], report["gate_hard_words"][:4]
    assert report["gate_hard_words"] == json.loads((tmp_path / "without" / "dog" / "prompts.json").read_text()
                                                   )["concepts"][0]["gate_hard_words"]
    assert len(combos) == 24 and all(sum(f" {w} " in f" {p} " for w in words) >= 2 for p in combos), (words, combos)
    every = [f"a picture of {' '.join(c)}" for n in (2, 3) for c in itertools.permutations(words, n)]
    comps = load_components(str(tiny_model_dir))
    X = last_word_states(comps.text_encoder, comps.tokenizer, every)  # (n, d)
    g = {k: _gate_values(torch.load(tmp_path / k / "dog" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"],
                         "dog", X) for k in ("with", "without")}
    assert g["with"].mean() < g["without"].mean() - 0.05, (g["with"].mean(), g["without"].mean())


def test_every_concepts_latents_are_generated_in_one_request_and_stay_with_their_concept(tiny_components, tmp_path,
                                                                                        monkeypatch):
    """The data module asks for all concepts' latents at once, so the missing ones are generated in full batches
    across concepts (benchmarks/latent_batching.py: 0.200 s a latent in batches of 4, 0.129 s in batches of 16);
    each concept still gets the latents of its own prompts and seeds, in order."""
    from ace_lightning.config import load_config
    from ace_lightning.data import datamodule as D
    from ace_lightning.data.prompts import ErasureRequest

    cfg = load_config(["concept=dog", f"data.cache_dir={tmp_path}", "data.latents_per_concept=3",
                       "data.latents_preserve=2", "data.prompts_per_concept=4", "data.preserve_prompts=4",
                       "data.neighbours_vocab=200", "data.vocab_preserve=200", "data.vocab_heldout=10"])
    calls = []
    real = D.generate
    monkeypatch.setattr(D, "generate", lambda pipe, prompts, seeds, *a, **k: calls.append(len(prompts))
                        or real(pipe, prompts, seeds, *a, **k))
    reqs = [ErasureRequest(c, "object", "animal") for c in ("dog", "cat", "horse")]
    dm = D.ErasureDataModule(tiny_components, reqs, cfg.data, D.SamplerSettings(steps=2), 0, 1, "test")
    dm.setup()
    assert calls == [2, 9]  # the preserve latents, then every concept's in one call
    pipe = tiny_components.pipeline()
    dm.sampler.apply(pipe)
    assert not torch.equal(dm.concepts[0].latents, dm.concepts[1].latents)  # a shifted split would be seen below
    for cd in dm.concepts:
        assert cd.latents.shape[0] == 3 and cd.latent_seeds == [0, 1, 2]  # seed * 104729 + i with seed 0
        assert all(re.search(rf"\b{cd.request.concept}\b", p) for p in cd.latent_prompts), cd.latent_prompts
        alone = real(pipe, cd.latent_prompts, cd.latent_seeds, 2, dm.sampler.guidance, output_type="latent",
                     eta=dm.sampler.eta)  # (3, c, h, w): this concept's latents generated by themselves
        torch.testing.assert_close(cd.latents, alone, atol=1e-4, rtol=1e-4)


def test_an_interrupted_latent_request_keeps_the_batches_it_finished_and_makes_a_repeated_pair_once(tiny_components,
                                                                                                    tmp_path):
    """One request holds every concept's latents, so it must not lose them all to a crash: each finished batch is
    on disk before the next starts, and a rerun generates only the rest. A (prompt, seed) pair asked twice is
    generated once."""
    from ace_lightning.data.datamodule import LatentCache
    from ace_lightning.models.sampling import SamplerSettings

    settings = SamplerSettings(steps=2)
    pipe = settings.apply(tiny_components.pipeline())

    class Crashing:  # the pipeline, failing on its second batch (a crash or Ctrl-C mid-request)
        def __init__(self, pipe):
            self.pipe, self.calls = pipe, 0

        def __getattr__(self, name):
            return getattr(self.pipe, name)

        def __call__(self, *a, **k):
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return self.pipe(*a, **k)

    prompts, seeds = [f"a photo of a {w}" for w in ("dog", "cat", "tree", "house", "dog")], [0, 1, 2, 3, 0]
    cache = LatentCache(tmp_path, "test", settings)
    with pytest.raises(KeyboardInterrupt):
        cache.get(Crashing(pipe), prompts, seeds, batch_size=2)
    assert [cache.path(p, s).exists() for p, s in zip(prompts, seeds)] == [True, True, False, False, True]
    again = LatentCache(tmp_path, "test", settings)
    x = again.get(pipe, prompts, seeds, batch_size=2)  # (5, c, h, w)
    assert again.generated == 2 and torch.equal(x[0], x[4]) and not torch.equal(x[0], x[1])
    fresh = LatentCache(tmp_path / "other", "test", settings)
    fresh.get(pipe, prompts, seeds, batch_size=2)
    assert fresh.generated == 4  # 'a photo of a dog' with seed 0 once
