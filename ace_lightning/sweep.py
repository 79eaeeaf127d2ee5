"""Hyperparameter sweeps whose objective is a benchmark number:
``python -m ace_lightning.sweep sweep=experiments/sweeps/<name>.yaml [count=n] [mode=offline|online] [out=dir]``.

A sweep file is a wandb sweep configuration (``method``, ``metric``, ``parameters``, ``command``) whose command runs
``ace_lightning.train`` with ``eval.suite`` set, so that every run ends with the suite's ``bench/*`` numbers.

- **offline** (the default when no W&B server is configured): the ``sweeps`` engine that ``wandb[sweeps]`` installs
  proposes each next run from the same YAML (grid, random, bayes), the run trains and evaluates in this process
  with ``WANDB_MODE=offline``, and its objective is fed back. No server, no network.
- **online** (``WANDB_API_KEY`` or ``WANDB_BASE_URL`` set, or ``mode=online``): ``wandb sweep`` + ``wandb agent`` on
  a copy of the YAML whose command writes the runs under the sweep's folder; early termination is the server's.

Every run is a normal run folder under ``<out>/runs/``. The sweep folder (``outputs/sweeps/<name>/``) gets
``results.csv``, ``results.md`` (sorted by the objective), ``parallel.png``, ``objective_vs_<key>.png`` per swept
key and ``best.yaml``, a recipe that ``make train CONCEPT=... ARGS="experiment=<path>"`` accepts. Rerunning a sweep
continues it: finished runs are read back from ``state.json``, not repeated.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from ace_lightning.registry import ConfigError
from ace_lightning.utils import atomic_write_json, atomic_write_text, say

SEARCH = ("grid", "random", "bayes")
# keys a sweep may not set: they are the sweep's own (where runs go and what they are called)
RESERVED = ("name", "output_dir", "overwrite", "ckpt_path", "concept", "concepts")


@dataclass
class SweepArgs:
    sweep: str = ""  # the sweep YAML
    count: int | None = None  # runs to finish in all (default: every grid point; required for random / bayes)
    mode: str | None = None  # offline | online; default online when WANDB_API_KEY or WANDB_BASE_URL is set
    out: str | None = None  # the sweep's folder (default outputs/sweeps/<yaml stem>)


def parse_args(argv: list[str]) -> SweepArgs:
    valid = [f.name for f in fields(SweepArgs)]
    kv = {}
    for a in argv:
        if "=" not in a:
            raise ConfigError(f"arguments must be key=value; got {a!r}; valid keys: {valid}")
        k, v = a.split("=", 1)
        if k not in valid:
            raise ConfigError(f"unknown sweep argument {k!r}; valid keys: {valid}")
        kv[k] = v
    args = SweepArgs(**{k: (int(v) if k == "count" and v else v or None) for k, v in kv.items()})
    if not args.sweep:
        raise ConfigError("sweep=<file.yaml> is required (experiments/sweeps/)")
    if args.mode not in (None, "offline", "online"):
        raise ConfigError(f"mode must be offline or online, got {args.mode!r}")
    if args.count is not None and args.count < 1:
        raise ConfigError(f"count must be >= 1, got {args.count}")
    return args


@dataclass
class Sweep:
    """A validated sweep file: its parsed YAML, the train arguments its command fixes, the objective and the base
    config of its runs (fixed arguments only)."""

    path: Path
    spec: dict
    fixed: list[str]
    metric: str
    goal: str
    base_cfg: Any

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def keys(self) -> list[str]:
        return list(self.spec["parameters"])


def fixed_args(command: list) -> list[str]:
    """The ``key=value`` train arguments of a sweep command (everything after ``ace_lightning.train`` that is not a
    ``${...}`` macro)."""
    words = [str(w) for w in command]
    if "ace_lightning.train" not in words:
        raise ConfigError("the sweep's command must run `python -m ace_lightning.train ... ${args_no_hyphens}`")
    if "${args_no_hyphens}" not in words:
        raise ConfigError("the sweep's command must pass the parameters as ${args_no_hyphens} (key=value overrides)")
    rest = words[words.index("ace_lightning.train") + 1 :]
    return [w for w in rest if not w.startswith("${")]


def _numeric(p: dict) -> bool:
    vals = p.get("values", [p["value"]] if "value" in p else [])
    return "min" in p or "max" in p or (bool(vals) and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                          for v in vals))


def _sample(p: dict):
    if "value" in p:
        return p["value"]
    if "values" in p:
        return p["values"][0]
    if "min" in p:
        return p["min"]
    raise ConfigError(f"a sweep parameter needs value, values or min/max; got {p}")


def _plain(value):
    """A proposed value as a plain Python scalar (the engine proposes numpy numbers)."""
    return value.item() if hasattr(value, "item") else value


def _arg(key: str, value) -> str:
    """``key=value`` that the config loader parses back to ``value`` (lists and strings as YAML flow)."""
    if isinstance(value, str):
        return f"{key}={value}"
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file before any run starts: the search method, the objective (a ``bench/*`` number
    the eval suite produces), every parameter (a config key, each value accepted by the config), a bayes search
    with at least one numeric parameter."""
    from ace_lightning.config import load_config

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} not found")
    spec = yaml.safe_load(path.read_text()) or {}
    missing = [k for k in ("method", "metric", "parameters", "command") if k not in spec]
    if missing:
        raise ConfigError(f"{path}: missing {missing} (a wandb sweep file: method, metric, parameters, command)")
    if spec["method"] not in SEARCH:
        raise ConfigError(f"{path}: method {spec['method']!r}; valid: {list(SEARCH)}")
    metric, goal = spec["metric"].get("name"), spec["metric"].get("goal", "maximize")
    if goal not in ("maximize", "minimize"):
        raise ConfigError(f"{path}: metric.goal must be maximize or minimize, got {goal!r}")
    params = spec["parameters"] or {}
    if not params:
        raise ConfigError(f"{path}: no parameters to sweep")
    fixed = fixed_args(spec["command"])
    base = load_config(fixed)
    bad_keys = [k for k in params if k in RESERVED or OmegaConf.select(base, k, default="<missing>") == "<missing>"]
    if bad_keys:
        raise ConfigError(f"{path}: {bad_keys} are not config keys a sweep may set; valid: dotted keys of "
                          f"experiments/base.yaml (e.g. loss.alpha_pres), not {list(RESERVED)}")
    for k, p in params.items():
        values = p.get("values", [_sample(p)] + ([p["max"]] if "max" in p else []))
        for v in values:
            try:
                load_config(fixed + [_arg(k, v)])
            except ConfigError as e:
                raise ConfigError(f"{path}: parameter {k}={v!r}: {e}") from None
    if spec["method"] == "bayes" and not any(_numeric(p) for p in params.values()):
        raise ConfigError(f"{path}: a bayes sweep needs at least one numeric parameter (min/max or numeric values); "
                          "use grid or random for categorical ones")
    if not base.eval.suite:
        raise ConfigError(f"{path}: the command sets no eval.suite, so the runs produce no bench/* objective; add "
                          "eval.suite=<suite> (and eval.* for a quick subset) to its command")
    produced = suite_metric_names(base)
    if metric not in produced:
        raise ConfigError(f"{path}: metric {metric!r} is not produced by eval suite {base.eval.suite!r}; valid: "
                          f"{sorted(produced)}")
    import sweeps

    problems = sweeps.schema_violations_from_proposed_config(_engine_config(spec))
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return Sweep(path, spec, fixed, metric, goal, base)


def suite_metric_names(cfg) -> set[str]:
    """The ``bench/*`` names that ``cfg.eval`` produces: its suite's metric sets (computed on no images, which
    lists their names; each name also has its ``_mod`` form), the ASR columns of its attacks, and ``eval/seconds``."""
    from ace_lightning.bench.attacks import asr_columns
    from ace_lightning.bench.config import csv_list, route_overrides
    from ace_lightning.bench.config import parse_args as bench_args
    from ace_lightning.bench.run import metric_factories
    from ace_lightning.bench.suites import load_suite
    from ace_lightning.config import eval_args

    bcfg = bench_args(eval_args(cfg, "adapter.safetensors", "out"))
    suite = load_suite(bcfg.suite)
    names = {"eval/seconds"}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics: compute() before update()
        for tag, make in metric_factories(route_overrides(suite.metrics, bcfg)):
            for k in make().compute():
                for form in (k, _mod_form(k)):
                    names.add(f"bench/{tag + '/' if tag else ''}{form}")
    attacks = csv_list(bcfg.attacks) or []
    names |= {f"bench/{c}" for c in asr_columns(attacks)} if attacks else set()
    return names


def _mod_form(name: str) -> str:
    head, _, tail = name.partition("_prob")
    return f"{head}_mod{'_prob' if _ else ''}{tail}"


def _engine_config(spec: dict) -> dict:
    return {k: spec[k] for k in ("method", "metric", "parameters") if k in spec}


# -- state: one record per run, written after every run -------------------------------------------------------------
def _read_state(out: Path) -> list[dict]:
    import json

    p = out / "state.json"
    return json.loads(p.read_text())["runs"] if p.is_file() else []


def _write_state(out: Path, sweep: Sweep, runs: list[dict]) -> None:
    atomic_write_json(out / "state.json", {"sweep": str(sweep.path), "metric": sweep.metric, "goal": sweep.goal,
                                           "runs": runs})


def _engine_runs(sweep: Sweep, runs: list[dict]):
    from sweeps import RunState, SweepRun

    out = []
    for r in runs:
        ok = r["state"] == "finished" and r.get("objective") is not None and math.isfinite(r["objective"])
        out.append(SweepRun(name=r["name"], config={k: {"value": v} for k, v in r["params"].items()},
                            summary_metrics={sweep.metric: r["objective"]} if ok else {},
                            state=RunState.finished if ok else RunState.failed))
    return out


def run_offline(sweep: Sweep, out: Path, count: int | None) -> list[dict]:
    """Propose, train + evaluate, record; until ``count`` runs have finished (or the grid is exhausted)."""
    import sweeps

    from ace_lightning.config import load_config
    from ace_lightning.train import run as train_run

    if sweep.spec["method"] != "grid" and count is None:
        raise ConfigError(f"a {sweep.spec['method']} sweep needs count=<runs>")
    if "early_terminate" in sweep.spec:
        say("offline sweep: early_terminate is the W&B server's; every run here goes to its end")
    os.environ["WANDB_MODE"] = "offline"
    runs = _read_state(out)
    done = sum(r["state"] == "finished" for r in runs)
    if runs:
        say(f"sweep {sweep.name}: {done} finished run(s) read back from {out / 'state.json'}")
    while count is None or done < count:
        _seed_engine(sweep, len(runs))
        proposal = sweeps.next_run(_engine_config(sweep.spec), _engine_runs(sweep, runs))
        if proposal is None:
            say(f"sweep {sweep.name}: the grid is exhausted after {len(runs)} run(s)")
            break
        params = {k: _plain(v["value"]) for k, v in proposal.config.items()}
        name = f"run-{len(runs) + 1:03d}"
        say(f"sweep {sweep.name} [{done + 1}/{count or '?'}] {name}: "
            + " ".join(_arg(k, v) for k, v in params.items()))
        args = sweep.fixed + [_arg(k, v) for k, v in params.items()] + [
            f"name={name}", f"output_dir={out / 'runs'}", "overwrite=true"]
        t0 = time.perf_counter()
        record = {"name": name, "params": params, "args": args}
        try:
            metrics = train_run(load_config(args))
            record |= {"state": "finished", "objective": metrics.get(sweep.metric),
                       "metrics": {k: v for k, v in metrics.items() if k.startswith(("bench/", "eval/", "run/"))}}
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - one failed run is a data point, not the end of the sweep
            record |= {"state": "failed", "objective": None, "metrics": {}, "error": f"{type(e).__name__}: {e}"}
            say(f"{name} failed: {record['error']}")
            traceback.print_exc()
        record["seconds"] = time.perf_counter() - t0
        runs.append(record)
        done += record["state"] == "finished"
        _write_state(out, sweep, runs)
        write_reports(sweep, out, runs)
    return runs


def _seed_engine(sweep: Sweep, n_runs: int) -> None:
    """The engine draws from numpy's global generator, which every training run re-seeds (``seed_everything``):
    unseeded, a bayes sweep proposed the same point twice in a row. Seeding it by (sweep, proposal number) makes
    the proposals distinct and an offline sweep reproducible."""
    import random
    import zlib

    import numpy as np

    key = zlib.crc32(f"{sweep.name}:{n_runs}".encode())
    np.random.seed(key)
    random.seed(key)


def online_available() -> bool:
    return bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_BASE_URL"))


def online_spec(sweep: Sweep, out: Path) -> dict:
    """The sweep file as the W&B server gets it: the command also writes each run under ``<out>/runs`` and logs
    online (each agent run names its folder after its wandb run id, see ``train.run``)."""
    spec = copy.deepcopy(sweep.spec)
    cmd = [str(w) for w in spec["command"]]
    at = cmd.index("${args_no_hyphens}")
    spec["command"] = cmd[:at] + [f"output_dir={out / 'runs'}", "logger.mode=online"] + cmd[at:]
    return spec


def run_online(sweep: Sweep, out: Path, count: int | None) -> list[dict]:
    """``wandb sweep`` (once; its id is kept in ``<out>/sweep_id.txt``, so a rerun continues the same sweep) and
    ``wandb agent``; then the reports from the run folders."""
    spec_file = out / "wandb_sweep.yaml"
    atomic_write_text(spec_file, yaml.safe_dump(online_spec(sweep, out), sort_keys=False))
    wandb = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    id_file = out / "sweep_id.txt"
    if not id_file.is_file():
        res = subprocess.run([wandb, "sweep", "--project", str(sweep.base_cfg.logger.project), str(spec_file)],
                             capture_output=True, text=True, check=False)
        text = res.stdout + res.stderr
        found = [w for line in text.splitlines() if "wandb agent" in line for w in line.split()[-1:]]
        if res.returncode or not found:
            raise RuntimeError(f"wandb sweep failed:\n{text}")
        atomic_write_text(id_file, found[0])
    cmd = [wandb, "agent", *(["--count", str(count)] if count else []), id_file.read_text().strip()]
    say(" ".join(cmd))
    subprocess.run(cmd, check=True)
    runs = collect_runs(sweep, out)
    _write_state(out, sweep, runs)
    write_reports(sweep, out, runs)
    return runs


def collect_runs(sweep: Sweep, out: Path) -> list[dict]:
    """Run records from ``<out>/runs/*/metrics.json`` and their config.yaml (the online agent's runs)."""
    import json

    runs = []
    for mfile in sorted((out / "runs").glob("*/metrics.json")):
        cfg = OmegaConf.load(mfile.with_name("config.yaml"))
        metrics = json.loads(mfile.read_text())["metrics"]
        runs.append({"name": mfile.parent.name, "params": {k: _plain_select(cfg, k) for k in sweep.keys},
                     "state": "finished", "objective": metrics.get(sweep.metric), "seconds": metrics.get("run/seconds"),
                     "metrics": {k: v for k, v in metrics.items() if k.startswith(("bench/", "eval/", "run/"))}})
    return runs


def _plain_select(cfg, key: str):
    """The value at a dotted ``key`` of ``cfg`` as plain Python (lists and dicts as containers)."""
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


# -- reports -----------------------------------------------------------------------------------------------------
def ranked(sweep: Sweep, runs: list[dict]) -> list[dict]:
    """Finished runs with an objective, best first."""
    ok = [r for r in runs if r["state"] == "finished" and r.get("objective") is not None]
    return sorted(ok, key=lambda r: r["objective"], reverse=sweep.goal == "maximize")


def write_reports(sweep: Sweep, out: Path, runs: list[dict]) -> None:
    keys = sweep.keys
    metric_cols = sorted({k for r in runs for k in r.get("metrics", {})})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", "state", *keys, "objective", "seconds", *metric_cols])
    for r in runs:
        w.writerow([r["name"], r["state"], *[r["params"].get(k) for k in keys], r.get("objective"),
                    r.get("seconds"), *[r.get("metrics", {}).get(k) for k in metric_cols]])
    atomic_write_text(out / "results.csv", buf.getvalue())
    best = ranked(sweep, runs)
    lines = [f"# Sweep `{sweep.name}`: {sweep.metric} ({sweep.goal})", "",
             f"`make sweep SWEEP={sweep.path}`: {len(runs)} run(s), {len(best)} finished with an objective; "
             "best first.", "", "| run | " + " | ".join(f"`{k}`" for k in keys) + f" | `{sweep.metric}` | seconds |",
             "|---|" + "---|" * (len(keys) + 2)]
    for r in best + [r for r in runs if r not in best]:
        obj = "failed" if r.get("objective") is None else f"{r['objective']:.2f}"
        sec = "" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['name']} | " + " | ".join(str(r["params"].get(k)) for k in keys) + f" | {obj} | {sec} |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    if best:
        write_best(sweep, out, best[0])
        plots(sweep, out, best)


def write_best(sweep: Sweep, out: Path, best: dict) -> None:
    """``best.yaml``: the best run's config where it differs from the defaults (``concept``/``name``/...
    left out), a recipe for ``make train CONCEPT=... ARGS="experiment=<this file>"``."""
    from ace_lightning.config import load_config

    run_cfg = OmegaConf.load(out / "runs" / best["name"] / "config.yaml")
    default = OmegaConf.to_container(load_config([f"concept={sweep.base_cfg.concepts[0].concept}"]), resolve=True)
    diff = _diff(OmegaConf.to_container(run_cfg, resolve=True), default)
    for k in (*RESERVED, "experiment", "eval"):
        diff.pop(k, None)
    head = (f"# best of sweep {sweep.name} ({sweep.path}): {best['name']}, {sweep.metric} = {best['objective']:.4g}\n"
            f"# make train CONCEPT=... ARGS=\"experiment={out / 'best.yaml'}\"\n")
    atomic_write_text(out / "best.yaml", head + yaml.safe_dump(diff, sort_keys=False))


def _diff(a: dict, b: dict) -> dict:
    out = {}
    for k, v in a.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict):
            sub = _diff(v, b[k])
            if sub:
                out[k] = sub
        elif b.get(k, object()) != v:
            out[k] = v
    return out


def _axis(values: list) -> tuple[list[float], list[str] | None]:
    """Numbers for a parameter's values (categories: their index) and the category labels (None when numeric)."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    cats = sorted({str(v) for v in values})
    return [float(cats.index(str(v))) for v in values], cats


def plots(sweep: Sweep, out: Path, runs: list[dict]) -> None:
    """``parallel.png`` (one line per run over the swept keys and the objective, coloured by the objective) and
    ``objective_vs_<key>.png`` per key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    obj = [r["objective"] for r in runs]
    cols = sweep.keys + [sweep.metric]
    axes = [_axis([r["params"].get(k) for r in runs]) for k in sweep.keys] + [(obj, None)]
    lo_hi = [(min(v), max(v)) for v, _ in axes]
    norm = [[(x - lo) / (hi - lo) if hi > lo else 0.5 for x in v] for (v, _), (lo, hi) in zip(axes, lo_hi)]
    cmap = plt.get_cmap("viridis")
    o_lo, o_hi = min(obj), max(obj)
    fig, ax = plt.subplots(figsize=(1.8 * len(cols) + 2, 4))
    for i in range(len(runs)):
        c = cmap((obj[i] - o_lo) / (o_hi - o_lo) if o_hi > o_lo else 0.5)
        ax.plot(range(len(cols)), [n[i] for n in norm], color=c, alpha=0.8, marker="o", ms=3)
    for j, ((_, cats), (lo, hi)) in enumerate(zip(axes, lo_hi)):
        ax.axvline(j, color="0.7", lw=0.8)
        ax.text(j, 1.03, cats[-1] if cats else f"{hi:.3g}", ha="center", fontsize=7)
        ax.text(j, -0.08, cats[0] if cats else f"{lo:.3g}", ha="center", fontsize=7)
    ax.set_xticks(range(len(cols)), cols, rotation=20, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_title(f"sweep {sweep.name}: {len(runs)} runs, colour = {sweep.metric}", fontsize=9, pad=14)
    fig.savefig(out / "parallel.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    for k, (v, cats) in zip(sweep.keys, axes):
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.scatter(v, obj, c=obj, cmap="viridis")
        if cats:
            ax.set_xticks(range(len(cats)), cats, rotation=20, fontsize=7)
        ax.set_xlabel(k)
        ax.set_ylabel(sweep.metric)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"objective_vs_{k.replace('/', '_')}.png", dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    from ace_lightning.utils import run_cli

    def go():
        args = parse_args(sys.argv[1:] if argv is None else argv)
        sweep = load_sweep(args.sweep)
        out = Path(args.out or Path("outputs") / "sweeps" / sweep.name)
        out.mkdir(parents=True, exist_ok=True)
        mode = args.mode or ("online" if online_available() else "offline")
        say(f"sweep {sweep.name} ({sweep.spec['method']}, {mode}): {sweep.metric} ({sweep.goal}) over "
            f"{', '.join(sweep.keys)} -> {out}")
        runs = run_online(sweep, out, args.count) if mode == "online" else run_offline(sweep, out, args.count)
        best = ranked(sweep, runs)
        if best:
            say(f"best: {best[0]['name']} {sweep.metric}={best[0]['objective']:.4g} "
                + " ".join(_arg(k, v) for k, v in best[0]["params"].items()) + f"; recipe {out / 'best.yaml'}")
        return runs

    return run_cli(go, config_label="sweep error")


if __name__ == "__main__":
    main()
