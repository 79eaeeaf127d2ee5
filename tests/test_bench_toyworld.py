"""The ToyWorld suites end to end with the shipped model, classifier and toy CLIP (skipped until built).

A few prompts per suite (the erased class and one retained class, one template, one seed); the slow
test trains a short ACE adapter and checks that the erased class's accuracy falls below the base model's.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ace_lightning.bench.run import main
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


@pytest.mark.parametrize("suite", sorted(SMALL))
def test_toy_suite_end_to_end(suite, tmp_path):
    classes, erased = SMALL[suite]
    res = main([f"suite={suite}", f"out={tmp_path}", "logger=none", f"classes={classes}", f"erased={erased}",
                "templates=1", "images_per_prompt=1", "steps=10"])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["settings"]["sampler"]["steps"] == 10 and m["settings"]["erased"] == [erased]
    assert all(i["scorer"].startswith("toy_") and i["weights_sha256"] for i in m["settings"]["scorers"].values())
    n_rows = len(list((tmp_path / "images" / "base").glob("*.png")))
    assert n_rows == (2 if suite == "toy-characters" else 4)  # (name [+ erased synonyms]) x 1 template x 1 seed
    nums = [v for k, v in res.items() if k.split("/")[-1] in ("Acc_e", "Acc_s", "Acc_e_prob", "Acc_s_prob")]
    assert nums and all(0.0 <= v <= 100.0 for v in nums)
    if suite == "toy-styles":
        assert 0 < res["bench/CS_e"] <= 100 and res["bench/H_a"] == pytest.approx(res["bench/CS_s"] - res["bench/CS_e"])
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "metrics.png").is_file()


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
