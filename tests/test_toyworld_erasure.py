"""End to end on the shipped ToyWorld model: erase a shape with the default recipe and check, with the
shipped classifier, that the concept and its synonyms are gone while the other shapes are kept."""

import pytest

from ace_lightning.toyworld import CLASSIFIER_DIR, PIPELINE_DIR

pytestmark = pytest.mark.skipif(not (PIPELINE_DIR / "model_index.json").is_file() or not CLASSIFIER_DIR.is_dir(),
                                reason="ToyWorld assets not built")

# Bounds the generic recipe meets today on every group (issue 8's targets are >= 0.85 per shape and 0.90 in docs:
# not met yet on modifier prompts, see docs/BENCHMARKS.md)
RETAINED_MEAN = 0.80
RETAINED_MIN = 0.25
TEMPLATES = ["a {}", "a picture of a {}", "a {c} {}", "a drawing of a {c} {}"]
COLORS = ["red", "green", "blue", "yellow"]


def _prompts(word: str, n: int) -> list[str]:
    return [TEMPLATES[i % len(TEMPLATES)].format(word, c=COLORS[(i // len(TEMPLATES)) % len(COLORS)]) for i in range(n)]


def _shape_share(pipe, clf, prompts, seeds, shape):
    from ace_lightning.models.sampling import generate

    imgs = generate(pipe, prompts, seeds, steps=20, guidance=5.0, batch_size=32, progress=False)
    pred = clf.predict(imgs)["shape"]
    return float((pred == clf.labels["shape"].index(shape)).float().mean()), pred


@pytest.mark.parametrize("erased", ["circle", "star,heart,cross"])
def test_generic_recipe_erases_shapes_keeps_the_others(tmp_path, toyworld_cache, erased):
    """The default recipe is the generic one (no ToyWorld vocabulary): erase one shape, or three in one adapter,
    then score every shape on held-out bare, synonym and modifier prompts (colour + style before the noun) with
    held-out seeds."""
    from ace_lightning import apply_adapter, remove_adapter
    from ace_lightning.config import load_config
    from ace_lightning.models.loading import load_components
    from ace_lightning.models.sampling import SamplerSettings
    from ace_lightning.toyworld import erasure_eval as E
    from ace_lightning.toyworld.classifier import load_classifier
    from ace_lightning.train import run

    names = erased.split(",")
    cfg = load_config([f"concept={erased}", f"output_dir={tmp_path}", "name=run", f"data.cache_dir={toyworld_cache}",
                       "logger.wandb=false", "grid.enabled=false", "trainer.enable_progress_bar=false"])
    assert cfg.data.template_family == "sd"  # the generic recipe is what a user of another model gets
    metrics = run(cfg)
    pipe = SamplerSettings(steps=20).apply(load_components(None).pipeline())
    clf = load_classifier()
    base = E.evaluate(pipe, clf, "shape", n=8)
    apply_adapter(pipe, tmp_path / "run" / "adapter.safetensors")
    after = E.evaluate(pipe, clf, "shape", n=8)
    remove_adapter(pipe)
    print(E.table(base, after, names))
    chance_bound = 1.5 / len(base)
    sb, sa = E.summary(base, names), E.summary(after, names)
    for g in E.GROUPS:
        assert sb[f"erased_max/{g}"] > chance_bound  # the untouched model draws circles: not vacuous
        assert sa[f"erased_max/{g}"] <= chance_bound, (g, {n: after[n] for n in names})
        assert sb[f"retained_min/{g}"] >= RETAINED_MIN  # ... and passes the retained bound
        # measured (benchmarks/toy_generic_recipe.py, n = 12), bare / synonym / modifier retained means: circle
        # 0.99 / 1.00 / 0.89 (minimum 0.50, 'star' with modifiers); star,heart,cross 0.98 / 1.00 / 0.85 (minimum
        # 0.67, 'diamond' with modifiers; 0.55 / 0.58 / 0.52 before the gate was fitted to its hard negatives)
        assert sa[f"retained_mean/{g}"] >= RETAINED_MEAN, (g, after)
        assert sa[f"retained_min/{g}"] >= RETAINED_MIN, (g, after)
    for n in names:
        assert metrics[f"gate/false_fire/{n}"] <= 0.02 and metrics[f"gate/target_fire/{n}"] >= 0.8, metrics
    if len(names) > 1:  # the summary over the n gates: any-gate false fire bounds each gate's and stays small
        worst = max(metrics[f"gate/false_fire/{n}"] for n in names)
        assert metrics["gate/false_fire_max"] == worst <= metrics["gate/false_fire_any"] <= 0.02 * len(names), metrics
        assert metrics["gate/target_fire_min"] == min(metrics[f"gate/target_fire/{n}"] for n in names)


def test_erase_style_keeps_other_styles(tmp_path, toyworld_cache):
    """A style shares its token direction with every other style word: erasing one must not flatten the rest.
    With the generic recipe (no ToyWorld words): before the gates were fitted it kept the other styles at 0.69 with
    modifiers (docs/BENCHMARKS.md), so this test used the ToyWorld recipe."""
    from ace_lightning import apply_adapter
    from ace_lightning.config import load_config
    from ace_lightning.models.loading import load_components
    from ace_lightning.models.sampling import SamplerSettings, generate
    from ace_lightning.toyworld.classifier import load_classifier
    from ace_lightning.toyworld.world import SHAPES, STYLES
    from ace_lightning.train import run

    erased, shapes = "dotted", list(SHAPES)
    cfg = load_config([f"concept={erased}", f"output_dir={tmp_path}", f"data.cache_dir={toyworld_cache}",
                       "logger.wandb=false", "grid.enabled=false", "trainer.enable_progress_bar=false"])
    assert cfg.data.template_family == "sd"
    run(cfg)
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

    run(load_config(["concept=square", "experiment=toyworld_recipe", f"output_dir={tmp_path}", f"data.cache_dir={toyworld_cache}",
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
