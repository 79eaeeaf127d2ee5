"""make compare (issue 10) on the tiny model: every output, reuse of finished runs, bootstrap intervals."""

import json
import math

import pytest
from test_bench_run import tiny_suite  # noqa: F401 - the tiny suite (tiny CLIP zero-shot + CLIP score)
from test_training import tiny_args

from ace_lightning.compare import bootstrap, main, metric_on_rows, parse_args, with_suite_model
from ace_lightning.registry import ConfigError


def test_compare_two_methods_writes_everything_and_reuses_runs(tiny_suite, tiny_model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "cmp"
    # the quick tiny-model settings of the training tests, for every method
    train = [f"train.{a}" for a in tiny_args(tiny_model_dir, tmp_path)[1:] if not a.startswith(("output_dir", "logger"))]
    argv = [f"suite={tiny_suite}", "concept=dog", "methods=uce,ace_closed_form_only", f"model={tiny_model_dir}",
            f"out={out}", "boot=50", "logger=none", "bench.threads=1", *train]
    res = main(argv)
    for f in ("compare.json", "compare.md", "compare.png", "grid.png", "bench/scores.jsonl"):
        assert (out / f).is_file(), f
    table = res["table"]
    assert list(table) == ["base", "uce", "ace_closed_form_only"]
    head = res["headline"]
    for v, e in table.items():
        x, (lo, hi) = e["metrics"][head], e["ci"][head]
        assert math.isnan(x) or lo - 1e-9 <= x <= hi + 1e-9, (v, x, lo, hi)
        if v != "base":
            assert e["cost"]["cost/adapt_seconds"] > 0 and e["cost"]["cost/unet_backward_samples"] == 0
    # the recomputed point numbers are the bench run's own
    bench = json.loads((out / "bench" / "metrics.json").read_text())["results"]
    assert table["uce"]["metrics"]["Acc_s"] == pytest.approx(bench["uce"]["bench/Acc_s"])
    md = (out / "compare.md").read_text()
    assert "| uce |" in md and "adapt s" in md and "make compare" in md
    stamps = {m: (out / "runs" / m / "adapter.safetensors").stat().st_mtime_ns for m in ("uce", "ace_closed_form_only")}
    main(argv)  # same config: nothing is retrained
    assert {m: (out / "runs" / m / "adapter.safetensors").stat().st_mtime_ns for m in stamps} == stamps
    # a method whose config changed is retrained, and its stale images are regenerated (it used to stop the
    # bench: "holds images generated with other settings"); the unchanged method keeps its images
    kept = (out / "bench" / "images" / "ace_closed_form_only" / "generation.json").read_text()
    res2 = main([*argv, "uce.closed_form.lam=0.2"])
    gen = json.loads((out / "bench" / "images" / "uce" / "generation.json").read_text())
    from ace_lightning.utils import file_digest

    assert gen["adapter_sha256"] == file_digest(out / "runs" / "uce" / "adapter.safetensors")
    assert (out / "bench" / "images" / "ace_closed_form_only" / "generation.json").read_text() == kept
    assert list(res2["table"]) == ["base", "uce", "ace_closed_form_only"]


def _rows(n_prompts, seed=0):
    """Erased prompts drawn right 30 % of the time, retained 80 %; 2 seeds per prompt."""
    import random

    rng = random.Random(seed)
    rows = []
    for g, p in ((0, 0.3), (1, 0.8)):
        for i in range(n_prompts):
            for s in range(2):
                hit = rng.random() < p
                rows.append({"group": g, "index": g * 10_000 + i, "seed": s, "target": 0 if g == 0 else 1,
                             "pred": (0 if g == 0 else 1) if hit else 2, "probs": [0.3, 0.3, 0.4]})
    return rows


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_prompts():
    cfg = {"name": "identity_erasure"}
    widths = []
    for n in (20, 320):
        rows = _rows(n)
        point = metric_on_rows(cfg, rows)["H_c"]
        lo, hi = bootstrap(cfg, rows, 300)["H_c"]
        assert lo <= point <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(16) of the width


def test_compare_bad_keys():
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        parse_args(["suite=x", "concept=y", "stepz=1"])
    with pytest.raises(ConfigError, match="unknown method"):
        parse_args(["suite=x", "concept=y", "methods=ace,nope"])
    with pytest.raises(ConfigError, match="required"):
        parse_args(["suite=x"])
    assert parse_args(["suite=x", "concept=y", "esd_x.optim.lr=1e-3"]).per_method == {"esd_x": ["optim.lr=1e-3"]}


def test_finished_run_is_reused_across_config_keys_added_since_with_their_defaults():
    """A run finished before a config key existed is the same run when the key now holds its default (what the code
    did before the key was added); any other difference, an added key set off its default or a removed key, is not.
    Found when adding adv.gate_refit_steps made `make compare` retrain every method and regenerate every image."""
    from omegaconf import OmegaConf

    from ace_lightning.compare import same_run
    from ace_lightning.config import load_config

    defaults = load_config(["concept=circle"])
    wanted = load_config(["concept=circle"])
    old = OmegaConf.to_container(wanted)
    del old["adv"]["gate_refit_steps"], old["eval"]  # a run written before these keys existed
    old_yaml = OmegaConf.to_yaml(OmegaConf.create(old))
    assert same_run(OmegaConf.to_yaml(wanted), wanted, defaults)
    assert same_run(old_yaml, wanted, defaults)
    assert not same_run(old_yaml, load_config(["concept=circle", "adv.gate_refit_steps=5"]), defaults)
    assert not same_run(old_yaml, load_config(["concept=square"]), defaults)
    with_field = OmegaConf.to_container(wanted)
    for c in with_field["concepts"]:
        del c["kind"]  # a run written before the concepts had a field that now holds its default
    assert same_run(OmegaConf.to_yaml(OmegaConf.create(with_field)), wanted, defaults)
    other = OmegaConf.to_container(wanted)
    other["concepts"][0]["kind"] = "style"  # ... but not when the field now holds something else
    assert not same_run(OmegaConf.to_yaml(OmegaConf.create(with_field)), OmegaConf.create(other), defaults)
    old["adv"]["retired_key"] = 1  # a key the config no longer has
    assert not same_run(OmegaConf.to_yaml(OmegaConf.create(old)), wanted, defaults)


def test_scale_curve_reads_points_from_compare_runs(tmp_path):
    """benchmarks/scale_curve.py: one point per method and run, x = the run's number of erased classes."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "scale_curve", Path(__file__).resolve().parents[1] / "benchmarks" / "scale_curve.py")
    sc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sc)
    paths = []
    for n, h in ((10, 85.0), (1, 95.0)):
        row = {"metrics": {"H_c": h}, "ci": {"H_c": [h - 5, h + 2]}, "cost": {"cost/adapt_seconds": 10.0 * n}}
        p = tmp_path / f"c{n}.json"
        p.write_text(json.dumps({"headline": "H_c", "settings": {"erased": [f"x{i}" for i in range(n)]},
                                 "table": {"base": row, "ace": row}}))
        paths.append(p)
    curves = sc.points(paths)
    assert list(curves) == ["ace"] and curves["ace"] == [(1, 95.0, 90.0, 97.0, 10.0), (10, 85.0, 80.0, 87.0, 100.0)]
    assert sc.plot(curves, "H_c", tmp_path / "curve.png").stat().st_size > 0


def test_finished_run_with_steps_per_concept_is_reused():
    """``trainer.steps_per_concept`` raises max_steps to k·n, and config.yaml records the steps run; the compare's
    reuse check must compare against that, not against the unscaled max_steps (found when every ``ace_many`` run
    at 100 names was retrained: 1000 recorded against 200 asked)."""
    from omegaconf import OmegaConf

    from ace_lightning.compare import same_run, wanted_config
    from ace_lightning.config import load_config, scale_steps

    args = ["concept=circle,square", "trainer.steps_per_concept=150"]
    written = scale_steps(load_config(args))  # what train.run records
    assert written.trainer.max_steps == 300
    defaults = load_config(["concept=circle"])
    assert same_run(OmegaConf.to_yaml(written), wanted_config(args), defaults)
    assert not same_run(OmegaConf.to_yaml(written), wanted_config([*args[:1], "trainer.steps_per_concept=100"]), defaults)


def test_compare_trains_and_benches_on_the_suite_model_unless_given_one():
    """toy-characters-100 names the cast variant: without model= the methods must be trained on it too, or the
    adapters would be benched on a model they were not made for; model= still wins."""
    assert with_suite_model(parse_args(["suite=toy-characters-100", "concept=zorblax"])).model == "toyworld-cast"
    assert with_suite_model(parse_args(["suite=toy-characters-100", "concept=zorblax", "model=/m"])).model == "/m"
    assert with_suite_model(parse_args(["suite=toy-objects", "concept=circle"])).model is None


def test_a_failing_method_leaves_its_log_written_as_it_went(tmp_path, monkeypatch):
    """A method's training output goes to ``runs/<method>.log`` while it runs (it used to be held in memory and
    written at the end, so a long training could not be followed); a failure names the log's last line."""
    import subprocess

    from ace_lightning.compare import train_all

    seen = {}

    def fake_run(cmd, stdout=None, **kw):
        stdout.write("step 1 of 200\n")
        stdout.flush()
        seen["during"] = (tmp_path / "cmp" / "runs" / "uce.log").read_text()  # readable before the process ends
        stdout.write("RuntimeError: boom\n")
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(subprocess, "run", fake_run)
    cfg = parse_args(["suite=toy-objects", "concept=circle", "methods=uce", f"out={tmp_path / 'cmp'}"])
    with pytest.raises(ConfigError, match="no method finished training"):
        train_all(cfg, tmp_path / "cmp")
    assert seen["during"] == "step 1 of 200\n"
    assert (tmp_path / "cmp" / "runs" / "uce.log").read_text().endswith("RuntimeError: boom\n")
