"""The ToyWorld suites end to end with the shipped model, classifier and toy CLIP (skipped until built).

A few prompts per suite (the erased class and one retained class, one template, one seed). The base model draws
every ToyWorld concept, so its numbers are known exactly (docs/BENCHMARKS.md, "Base ToyWorld model"): every
argmax accuracy is 100 and H_o / H_c are 0. toy-objects also runs a closed-form-only 'circle' adapter (no
stage-2 steps, a few seconds), which must take circle and its synonyms to 0 and leave square at 100. The slow
tests train a short ACE adapter, and closed-form adapters for the other two suites' erased concepts.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ace_lightning.bench.run import main
from ace_lightning.config import load_config
from ace_lightning.toyworld import CLASSIFIER_DIR, CLIP_DIR, PIPELINE_DIR

pytestmark = pytest.mark.skipif(
    not (PIPELINE_DIR.is_dir() and CLIP_DIR.is_dir() and CLASSIFIER_DIR.is_dir()),
    reason="ToyWorld assets not built (make toyworld)",
)

SMALL = {  # suite -> (classes, erased): the erased class and one retained class
    "toy-objects": ("circle,square", "circle"),
    "toy-styles": ("striped,plain", "striped"),
    "toy-characters": ("zorblax,mivelle", "zorblax"),
}


# The base model's numbers on SMALL (steps=10), measured: every argmax accuracy 100, H 0, and (toy-styles) the
# toy-CLIP scores. docs/BENCHMARKS.md has the full 25-step suites: the classifier's accuracies are 100 there too.
BASE = {
    "toy-objects": {"Acc_e": 100.0, "Acc_s": 100.0, "Acc_g": 100.0, "H_o": 0.0,
                    "clip/Acc_e": 100.0, "clip/Acc_s": 100.0, "clip/Acc_g": 100.0, "clip/H_o": 0.0},
    "toy-styles": {"cls/Acc_e": 100.0, "cls/Acc_s": 100.0, "cls/Acc_g": 100.0, "cls/H_o": 0.0},
    "toy-characters": {"Acc_e": 100.0, "Acc_s": 100.0, "H_c": 0.0, "clip/Acc_e": 100.0, "clip/Acc_s": 100.0, "clip/H_c": 0.0,
                       "Acc_look": 100.0},  # the base model draws zorblax's look from words too
}
BASE_CS = {"CS_e": 30.54, "CS_s": 65.64, "CS_g": 27.79}  # toy-styles, toy CLIP score (striped, plain, synonyms)
# the closed-form 'circle' adapter on toy-objects: circle and its synonyms erased, square kept
ERASED = {"Acc_e": 0.0, "Acc_s": 100.0, "Acc_g": 0.0, "H_o": 100.0,
          "clip/Acc_e": 0.0, "clip/Acc_s": 100.0, "clip/Acc_g": 0.0, "clip/H_o": 100.0}


def closed_form_adapter(concept: str, out: Path) -> Path:
    """An ACE adapter with the closed form only (trainer.max_steps=0), trained in-process; 1 cached latent per
    concept and preserve set (the closed form does not use latents; the data module still builds its cache)."""
    from ace_lightning.train import run

    run(load_config([f"concept={concept}", "experiment=toyworld_recipe", "trainer.max_steps=0", "grid.enabled=false", "logger.wandb=false",
                     "trainer.enable_progress_bar=false", f"output_dir={out}", f"data.cache_dir={out / 'cache'}",
                     "data.latents_per_concept=1", "data.latents_preserve=1", "trainer.threads=1"]))
    path = out / concept / "adapter.safetensors"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def circle_adapter(tmp_path_factory):
    return closed_form_adapter("circle", tmp_path_factory.mktemp("cf_circle"))


def _bench(suite, out, *extra):
    classes, erased = SMALL[suite]
    return main([f"suite={suite}", f"out={out}", "logger=none", f"classes={classes}", f"erased={erased}",
                 "templates=1", "images_per_prompt=1", "steps=10", "threads=1", *extra])


def _strip(r: dict) -> dict:
    return {k.removeprefix("bench/"): v for k, v in r.items()}


@pytest.mark.parametrize("suite", sorted(SMALL))
def test_toy_suite_end_to_end(suite, tmp_path, request):
    classes, erased = SMALL[suite]
    extra = [f"adapter={request.getfixturevalue('circle_adapter')}"] if suite == "toy-objects" else []
    res = _bench(suite, tmp_path, *extra)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["settings"]["sampler"]["steps"] == 10 and m["settings"]["erased"] == [erased]
    assert all(i["scorer"].startswith("toy_") and i["weights_sha256"] for i in m["settings"]["scorers"].values())
    n_rows = len(list((tmp_path / "images" / "base").glob("*.png")))
    # (name [+ erased synonyms]) x 1 template x 1 seed, and as many with the first modifier template;
    # toy-characters: the two names and the erased one's look in words
    assert n_rows == (3 if suite == "toy-characters" else 8)
    assert list(m["results"]) == (["base", "circle"] if extra else ["base"])
    base = _strip(m["results"]["base"])
    assert {k: base[k] for k in BASE[suite]} == BASE[suite]
    if suite != "toy-characters":  # the same, on the modifier prompts ("a blue dotted circle", ...)
        assert {f"{k}_mod": base[f"{k}_mod"] for k in BASE[suite]} == {f"{k}_mod": v for k, v in BASE[suite].items()}
    for k in BASE[suite]:  # the mean true-class probabilities agree: the base model is confident
        if k.endswith(("Acc_e", "Acc_s", "Acc_g")):
            assert base[f"{k}_prob"] > 95.0, (k, base[f"{k}_prob"])
    if suite == "toy-styles":
        assert {k: base[k] for k in BASE_CS} == pytest.approx(BASE_CS, abs=0.5)
        assert base["H_a"] == pytest.approx(base["CS_s"] - base["CS_e"])
    if extra:  # toy-objects: the closed-form 'circle' adapter moves every erased-side number, keeps square
        erased_r = _strip(m["results"]["circle"])
        assert _strip(res) == erased_r  # the last variant is the returned (primary) one
        assert {k: erased_r[k] for k in ERASED} == pytest.approx(ERASED, abs=0.5)
        for k in ("Acc_e_prob", "Acc_g_prob", "clip/Acc_e_prob", "clip/Acc_g_prob"):
            # from > 95 on the base model; < 5 before the gates were fitted (issue 8), 8.1 / 7.8 since: the fitted
            # gate passes less of this closed-form-only edit, the argmax shares above are still 0
            assert erased_r[k] < 10.0, (k, erased_r[k])
        assert erased_r["Acc_s_prob"] > 95.0 and erased_r["clip/Acc_s_prob"] > 90.0
        assert len(list((tmp_path / "images" / "circle").glob("*.png"))) == 8
        mod = {f"{k}_mod": v for k, v in ERASED.items()}  # with colour / style words too (measured)
        assert {k: erased_r[k] for k in mod} == pytest.approx(mod, abs=0.5)
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "metrics.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["toy-styles", "toy-characters"])
def test_closed_form_adapter_moves_the_other_suites(suite, tmp_path):
    """The closed-form adapters of 'striped' and 'zorblax' take their suites' erased accuracies (by the classifier)
    from 100 to 0 and keep the retained class at 100."""
    _, erased = SMALL[suite]
    adapter = closed_form_adapter(erased, tmp_path / "train")
    _bench(suite, tmp_path / "bench", f"adapter={adapter}")
    r = json.loads((tmp_path / "bench" / "metrics.json").read_text())["results"]
    base, after = _strip(r["base"]), _strip(r[erased])
    acc = "cls/" if suite == "toy-styles" else ""
    assert base[f"{acc}Acc_e"] == 100.0 and after[f"{acc}Acc_e"] == 0.0
    assert after[f"{acc}Acc_s"] == 100.0
    if suite == "toy-styles":
        assert after["CS_e"] < base["CS_e"] - 5 and after["H_a"] > base["H_a"]
    else:  # the classifier's look; the toy-CLIP zero-shot still names zorblax after the closed form alone (measured)
        assert after["H_c"] == 100.0


@pytest.mark.slow
def test_erased_concept_accuracy_drops(tmp_path):
    """Train a short ACE adapter for 'circle', then run toy-objects on circle + square prompts."""
    env = dict(os.environ, WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "ace_lightning.train", "concept=circle", f"output_dir={tmp_path}",
           "trainer.max_steps=30", "adv.enabled=false", "grid.enabled=false", "logger.wandb=false",
           "trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = Path(tmp_path) / "circle" / "adapter.safetensors"
    out = tmp_path / "bench"
    main(["suite=toy-objects", f"out={out}", "logger=none", f"adapter={adapter}", "classes=circle,square",
          "templates=2", "images_per_prompt=2"])
    r = json.loads((out / "metrics.json").read_text())["results"]
    base, erased = r["base"], r[list(r)[-1]]
    assert erased["bench/Acc_e"] < base["bench/Acc_e"]
    assert erased["bench/Acc_e_prob"] < base["bench/Acc_e_prob"]
