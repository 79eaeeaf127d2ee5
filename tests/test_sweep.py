"""Sweeps (issue 12): train -> evaluate in one run, the offline sweep engine, reports, best.yaml, resume, bad input."""

import csv
import json

import pytest
import yaml
from omegaconf import OmegaConf
from test_bench_run import tiny_suite  # noqa: F401 - the tiny suite (tiny CLIP zero-shot + CLIP score)
from test_training import tiny_args

from ace_lightning.config import EXPERIMENTS_DIR, load_config
from ace_lightning.registry import ConfigError
from ace_lightning.sweep import load_sweep, main, online_spec

# the numbers of a random tiny model mean nothing; Acc_s is finite on the tiny suite (H_o is NaN: 'star' has no
# synonyms), so it serves as the objective that the engine and the reports handle
METRIC = "bench/Acc_s"


def _sweep_file(tmp_path, suite, model, method="grid", parameters=None, metric=METRIC, extra=()):
    args = [a for a in tiny_args(model, tmp_path) if not a.startswith(("output_dir", "logger"))]
    spec = {
        "method": method, "metric": {"name": metric, "goal": "maximize"},
        "parameters": parameters or {"loss.alpha_pres": {"values": [1.0, 2.0, 3.0]}},
        "command": ["${env}", "python", "-m", "ace_lightning.train", *args, "trainer.max_steps=2",
                    f"eval.suite={suite}", "eval.args=[threads=1]", *extra, "${args_no_hyphens}"],
    }
    path = tmp_path / "tiny_sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_train_runs_the_eval_suite_in_the_same_run(tiny_suite, tiny_model_dir, tmp_path):  # noqa: F811
    """eval.suite: the bench numbers of the adapter just trained come back from run() and land in metrics.json,
    with the same names as make bench's."""
    from ace_lightning.train import run

    m = run(load_config(tiny_args(tiny_model_dir, tmp_path, "trainer.max_steps=1", f"eval.suite={tiny_suite}",
                                  "eval.images_per_prompt=1", "eval.args=[threads=1]")))
    bench = json.loads((tmp_path / "dog" / "eval" / "metrics.json").read_text())["results"]
    assert list(bench) == ["dog"]  # the adapter only: a sweep needs no base-model images
    assert m["bench/Acc_s"] == pytest.approx(bench["dog"]["bench/Acc_s"]) and m["bench/n_images"] == 6
    saved = json.loads((tmp_path / "dog" / "metrics.json").read_text())["metrics"]
    assert saved["bench/Acc_s"] == m["bench/Acc_s"] and saved["eval/seconds"] > 0


def test_bad_eval_settings_fail_before_training(tiny_suite, tiny_model_dir, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="valid keys"):
        load_config(tiny_args(tiny_model_dir, tmp_path, f"eval.suite={tiny_suite}", "eval.args=[bogus=1]"))
    with pytest.raises(ConfigError, match="trainer.devices"):
        load_config(tiny_args(tiny_model_dir, tmp_path, f"eval.suite={tiny_suite}", "trainer.devices=2"))


def test_offline_grid_sweep_reports_best_recipe_and_resumes(tiny_suite, tiny_model_dir, tmp_path):  # noqa: F811
    path = _sweep_file(tmp_path, tiny_suite, tiny_model_dir)
    out = tmp_path / "sweep"
    runs = main([f"sweep={path}", f"out={out}", "mode=offline"])
    assert [r["state"] for r in runs] == ["finished"] * 3
    assert sorted(r["params"]["loss.alpha_pres"] for r in runs) == [1.0, 2.0, 3.0]  # three distinct runs
    for r in runs:  # each a normal run folder whose config has the proposed value
        cfg = OmegaConf.load(out / "runs" / r["name"] / "config.yaml")
        assert cfg.loss.alpha_pres == r["params"]["loss.alpha_pres"]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(row["objective"] not in ("", "None") for row in rows)
    assert {"loss.alpha_pres", METRIC, "seconds"} <= set(rows[0])
    for f in ("results.md", "parallel.png", "objective_vs_loss.alpha_pres.png", "best.yaml", "state.json"):
        assert (out / f).is_file(), f
    best = max(runs, key=lambda r: r["objective"])
    md = (out / "results.md").read_text()
    assert md.index(f"| {best['name']} |") < min(md.index(f"| {r['name']} |") for r in runs if r is not best)
    # best.yaml is a recipe that reproduces the best run's config
    best_cfg = OmegaConf.to_container(load_config(["concept=dog", f"experiment={out / 'best.yaml'}"]))
    run_cfg = OmegaConf.to_container(OmegaConf.load(out / "runs" / best["name"] / "config.yaml"))
    for k in ("name", "output_dir", "overwrite", "experiment", "eval", "concept", "concepts"):
        best_cfg.pop(k), run_cfg.pop(k)
    assert best_cfg == run_cfg
    # rerun: the finished runs are read back, nothing runs again
    stamps = {r["name"]: (out / "runs" / r["name"] / "adapter.safetensors").stat().st_mtime_ns for r in runs}
    again = main([f"sweep={path}", f"out={out}", "mode=offline"])
    assert [r["name"] for r in again] == [r["name"] for r in runs]
    assert {n: (out / "runs" / n / "adapter.safetensors").stat().st_mtime_ns for n in stamps} == stamps
    assert not (out / "runs" / "run-004").exists()


def test_bayes_proposals_stay_distinct_when_runs_reseed_numpy(tmp_path, monkeypatch):
    """The engine draws from numpy's global generator and every training run re-seeds it (seed_everything):
    unseeded, the ToyWorld bayes sweep proposed one point twice in a row (2 distinct of 5 here). Runs are faked:
    the objective is alpha_pres, so only the engine and the loop are exercised."""
    import numpy as np

    import ace_lightning.sweep as S
    import ace_lightning.train as T

    def fake_run(cfg):
        np.random.seed(0)  # what seed_everything does in every run
        return {"bench/H_o": float(cfg.loss.alpha_pres)}

    monkeypatch.setattr(T, "run", fake_run)
    monkeypatch.setattr(S, "write_reports", lambda *a, **k: None)
    runs = S.run_offline(load_sweep(EXPERIMENTS_DIR / "sweeps" / "toy_objects.yaml"), tmp_path, 5)
    points = [tuple(sorted(r["params"].items())) for r in runs]
    assert len(runs) == 5 and len(set(points)) == 5, points


def test_bad_sweeps_fail_before_any_run(tiny_suite, tiny_model_dir, tmp_path):  # noqa: F811
    bad = {"not a key": ({"loss.alpha_presx": {"values": [1.0]}}, METRIC, "grid", "not config keys"),
           "reserved": ({"output_dir": {"values": ["x"]}}, METRIC, "grid", "not config keys"),
           "bad value": ({"adapter.rank": {"values": [0]}}, METRIC, "grid", "adapter.rank"),
           "metric": ({"loss.eta": {"values": [1.0]}}, "bench/H_z", "grid", "not produced by eval suite"),
           "bayes": ({"adv.position": {"values": ["prefix", "replace"]}}, METRIC, "bayes", "numeric parameter")}
    for what, (params, metric, method, message) in bad.items():
        path = _sweep_file(tmp_path, tiny_suite, tiny_model_dir, method=method, parameters=params, metric=metric)
        with pytest.raises(ConfigError, match=message):
            load_sweep(path)
        assert not (tmp_path / "dog").exists(), what  # nothing trained
    no_eval = _sweep_file(tmp_path, tiny_suite, tiny_model_dir)
    spec = yaml.safe_load(no_eval.read_text())
    spec["command"] = [w for w in spec["command"] if not str(w).startswith("eval.")]
    no_eval.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="eval.suite"):
        load_sweep(no_eval)


def test_online_spec_writes_runs_under_the_sweep_and_logs_online(tiny_suite, tiny_model_dir, tmp_path):  # noqa: F811
    sweep = load_sweep(_sweep_file(tmp_path, tiny_suite, tiny_model_dir))
    cmd = online_spec(sweep, tmp_path / "s")["command"]
    assert cmd[-1] == "${args_no_hyphens}" and f"output_dir={tmp_path / 's' / 'runs'}" in cmd
    assert "logger.mode=online" in cmd


@pytest.mark.parametrize("path", sorted((EXPERIMENTS_DIR / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweeps_validate(path):
    """Every shipped sweep: real config keys whose values the config accepts, an objective its eval suite
    produces, a command that runs the trainer with eval.suite set."""
    sweep = load_sweep(path)
    assert sweep.metric.startswith("bench/") and sweep.base_cfg.eval.suite
