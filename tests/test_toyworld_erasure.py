"""End to end on the shipped ToyWorld model: erase a shape with the default recipe and check, with the
shipped classifier, that the concept and its synonyms are gone while the other shapes are kept."""

import pytest
import torch

from ace_lightning.toyworld import CLASSIFIER_DIR, PIPELINE_DIR

pytestmark = pytest.mark.skipif(not (PIPELINE_DIR / "model_index.json").is_file() or not CLASSIFIER_DIR.is_dir(),
                                reason="ToyWorld assets not built")

ERASED = "circle"
TEMPLATES = ["a {}", "a picture of a {}", "a {c} {}", "a drawing of a {c} {}"]
COLORS = ["red", "green", "blue", "yellow"]


def _prompts(word: str, n: int) -> list[str]:
    return [TEMPLATES[i % len(TEMPLATES)].format(word, c=COLORS[(i // len(TEMPLATES)) % len(COLORS)]) for i in range(n)]


def _shape_share(pipe, clf, prompts, seeds, shape):
    from ace_lightning.models.sampling import generate

    imgs = generate(pipe, prompts, seeds, steps=20, guidance=5.0, batch_size=32, progress=False)
    pred = clf.predict(imgs)["shape"]
    return float((pred == clf.labels["shape"].index(shape)).float().mean()), pred


def test_erase_circle_keeps_other_shapes(tmp_path, toyworld_cache):
    from ace_lightning import apply_adapter, remove_adapter
    from ace_lightning.config import load_config
    from ace_lightning.models.loading import load_components
    from ace_lightning.models.sampling import SamplerSettings
    from ace_lightning.toyworld.classifier import load_classifier
    from ace_lightning.toyworld.world import SHAPES
    from ace_lightning.train import run

    n_shapes = len(SHAPES)
    chance_bound = 1.5 / n_shapes
    cfg = load_config([f"concept={ERASED}", f"output_dir={tmp_path}", f"data.cache_dir={toyworld_cache}",
                       "logger.wandb=false", "grid.enabled=false", "trainer.enable_progress_bar=false"])
    run(cfg)  # the default recipe, unchanged except for I/O
    adapter = tmp_path / ERASED / "adapter.safetensors"

    comps = load_components(None)
    pipe = comps.pipeline()
    SamplerSettings(steps=20).apply(pipe)
    clf = load_classifier()
    concept_prompts = _prompts(ERASED, 24)
    synonym_prompts = [p for s in SHAPES[ERASED] for p in _prompts(s, 12)]
    others = [s for s in SHAPES if s != ERASED]
    other_prompts = [p for s in others for p in _prompts(s, 6)]
    other_labels = torch.tensor([clf.labels["shape"].index(s) for s in others for _ in range(6)])
    seeds = lambda n: list(range(1000, 1000 + n))  # noqa: E731

    base_share, _ = _shape_share(pipe, clf, concept_prompts, seeds(24), ERASED)
    assert base_share > chance_bound, "the untouched model must draw the concept, or the test is vacuous"

    apply_adapter(pipe, adapter)
    share, _ = _shape_share(pipe, clf, concept_prompts, seeds(24), ERASED)
    syn_share, _ = _shape_share(pipe, clf, synonym_prompts, seeds(len(synonym_prompts)), ERASED)
    _, pred = _shape_share(pipe, clf, other_prompts, seeds(len(other_prompts)), ERASED)
    other_acc = float((pred == other_labels).float().mean())
    remove_adapter(pipe)
    print(f"base {base_share:.3f} erased {share:.3f} synonyms {syn_share:.3f} others {other_acc:.3f}")
    assert share <= chance_bound, share
    assert syn_share <= chance_bound, syn_share
    assert other_acc >= 0.85, other_acc


def test_erase_style_keeps_other_styles(tmp_path, toyworld_cache):
    """A style shares its token direction with every other style word: erasing one must not flatten the rest."""
    from ace_lightning import apply_adapter
    from ace_lightning.config import load_config
    from ace_lightning.models.loading import load_components
    from ace_lightning.models.sampling import SamplerSettings, generate
    from ace_lightning.toyworld.classifier import load_classifier
    from ace_lightning.toyworld.world import SHAPES, STYLES
    from ace_lightning.train import run

    erased, shapes = "dotted", list(SHAPES)
    run(load_config([f"concept={erased}", f"output_dir={tmp_path}", f"data.cache_dir={toyworld_cache}",
                     "logger.wandb=false", "grid.enabled=false", "trainer.enable_progress_bar=false"]))
    pipe = SamplerSettings(steps=20).apply(load_components(None).pipeline())
    clf = load_classifier()

    def style_acc(word, label, n=16):
        prompts = [f"a {['red', 'green', 'blue'][i % 3]} {word} {shapes[i % len(shapes)]}" for i in range(n)]
        pred = clf.predict(generate(pipe, prompts, list(range(n)), 20, 5.0, progress=False))["style"]
        return float((pred == clf.labels["style"].index(label)).float().mean())

    chance_bound = 1.5 / len(STYLES)
    assert style_acc(erased, erased) > chance_bound  # the untouched model draws it: the test is not vacuous
    apply_adapter(pipe, tmp_path / erased / "adapter.safetensors")
    assert style_acc(erased, erased) <= chance_bound
    assert style_acc(STYLES[erased][0], erased) <= chance_bound  # synonym
    kept = {s: style_acc(s, s) for s in STYLES if s != erased}
    assert min(kept.values()) >= 0.85, kept


def test_erase_square_keeps_circle_synonyms(tmp_path, toyworld_cache):
    """Mined neighbours must not erase other concepts: 'square' used to mine 'ring' (a circle synonym) and
    'solid', 'filled' (the neutral style's synonyms), which then mapped to the neutral shape."""
    import json

    from ace_lightning import apply_adapter
    from ace_lightning.config import load_config
    from ace_lightning.models.loading import load_components
    from ace_lightning.models.sampling import SamplerSettings
    from ace_lightning.toyworld.classifier import load_classifier
    from ace_lightning.toyworld.world import SHAPES
    from ace_lightning.train import run

    run(load_config(["concept=square", f"output_dir={tmp_path}", f"data.cache_dir={toyworld_cache}",
                     "logger.wandb=false", "grid.enabled=false", "trainer.enable_progress_bar=false"]))
    report = json.loads((tmp_path / "square" / "prompts.json").read_text())
    mined = [n["word"] for n in report["concepts"][0]["neighbours"]]
    assert not {"ring", "round", "disc", "solid", "filled"} & set(mined), mined

    pipe = SamplerSettings(steps=20).apply(load_components(None).pipeline())
    clf = load_classifier()
    prompts = [p for s in SHAPES["circle"] for p in _prompts(s, 12)]  # "round disc", "ring" in 4 templates
    seeds = list(range(2000, 2000 + len(prompts)))
    before, _ = _shape_share(pipe, clf, prompts, seeds, "circle")
    apply_adapter(pipe, tmp_path / "square" / "adapter.safetensors")
    after, _ = _shape_share(pipe, clf, prompts, seeds, "circle")
    square_share, _ = _shape_share(pipe, clf, _prompts("square", 12), seeds[:12], "square")
    print(f"circle synonyms drawn as circles: {before:.3f} -> {after:.3f}; square erased to {square_share:.3f}")
    # tolerance: 3 of 24 images (sampling noise between two adapters measured at 1-2 images)
    assert after >= before - 3 / 24, (before, after)
    assert square_share <= 1.5 / len(SHAPES)  # and square itself is erased
