"""Methods side by side: ``python -m ace_lightning.compare suite=<suite> concept=<c[,c2]> [methods=a,b] [k=v ...]``.

For every method: train it for the concept(s) (a finished run whose resolved config is identical is reused),
then run the suite **once** with every adapter as a variant next to the base model (same prompts, seeds and
scorers), then resample prompts to put 95 % bootstrap intervals on the suite's own numbers. Writes
``<out>/compare.json``, ``compare.md``, ``compare.png`` (headline number vs adaptation seconds) and ``grid.png``
(one row per method); the bench run is in ``<out>/bench``, the training runs in ``<out>/runs/<method>``.

Keys: ``suite``, ``concept``, ``methods`` (default: every registered method), ``model``, ``devices``, ``out``,
``boot`` (bootstrap resamples), ``logger`` (wandb | none); ``train.<key>=v`` goes to every training run,
``<method>.<key>=v`` to one method's (e.g. ``esd_x.experiment=esd_toyworld``), ``bench.<key>=v`` to the suite run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ace_lightning.registry import ConfigError, build, names

HEADLINE = {"object_erasure": "H_o", "identity_erasure": "H_c", "style_erasure": "H_a"}
COST = ["cost/adapt_seconds", "cost/unet_forward_samples", "cost/unet_backward_samples", "cost/peak_rss_mib"]


@dataclass
class CompareConfig:
    suite: str = ""
    concept: str = ""
    methods: list[str] = field(default_factory=list)
    model: str | None = None
    devices: int = 1
    out: str | None = None
    boot: int = 1000
    logger: str = "wandb"
    train: list[str] = field(default_factory=list)  # key=value for every training run
    per_method: dict[str, list[str]] = field(default_factory=dict)  # method -> key=value
    bench: list[str] = field(default_factory=list)  # key=value for the suite run


def parse_args(argv: list[str]) -> CompareConfig:
    cfg = CompareConfig()
    methods = names("method")
    top = {"suite", "concept", "methods", "model", "devices", "out", "boot", "logger"}
    for a in argv:
        if "=" not in a:
            raise ConfigError(f"arguments must be key=value; got {a!r}")
        key, value = a.split("=", 1)
        head, _, rest = key.partition(".")
        if key in top:
            if key == "methods":
                cfg.methods = [m.strip() for m in value.split(",") if m.strip()]
            elif key in ("devices", "boot"):
                cfg.__setattr__(key, int(value))
            else:
                cfg.__setattr__(key, value)
        elif head == "train" and rest:
            cfg.train.append(f"{rest}={value}")
        elif head == "bench" and rest:
            cfg.bench.append(f"{rest}={value}")
        elif head in methods and rest:
            cfg.per_method.setdefault(head, []).append(f"{rest}={value}")
        else:
            raise ConfigError(f"unknown key {key!r}; valid: {sorted(top)}, train.<key>, bench.<key>, <method>.<key> "
                              f"(methods: {methods})")
    if not cfg.suite or not cfg.concept:
        raise ConfigError("suite=<name> and concept=<name>[,<name>] are required")
    cfg.methods = cfg.methods or methods
    unknown = [m for m in cfg.methods + list(cfg.per_method) if m not in methods]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; valid: {methods}")
    if cfg.boot < 0:
        raise ConfigError(f"boot={cfg.boot} is out of range: must be >= 0")
    return cfg


def with_suite_model(cfg: CompareConfig) -> CompareConfig:
    """``model`` defaults to the suite's own (toy-characters-100: ``toyworld-cast``), for training and bench alike:
    a method trained on one model and benched on another would measure nothing."""
    from ace_lightning.bench.suites import load_suite

    if not cfg.model:
        cfg.model = load_suite(cfg.suite).model
    return cfg


def _flat(tree, prefix: str = "") -> dict:
    """Nested dicts and lists of dicts as {"a.b.c": leaf, "concepts.0.kind": leaf}; other lists are leaves."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    out = {}
    for k, v in items:
        nested = (isinstance(v, dict) and v) or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))
        out.update(_flat(v, f"{prefix}{k}.") if nested else {f"{prefix}{k}": v})
    return out


def same_run(old_yaml: str, wanted, defaults) -> bool:
    """Whether a finished run's config (``old_yaml``, its config.yaml) is the run ``wanted`` asks for: every key
    equal, except keys the old config lacks (added to the config since) whose wanted value is their default in
    ``defaults``, which is what the code did before they existed. A concept's fields count by position
    (``concepts.<i>.<field>``), their defaults being the first concept's in ``defaults``."""
    from omegaconf import OmegaConf

    old = _flat(OmegaConf.to_container(OmegaConf.create(old_yaml)))
    new = _flat(OmegaConf.to_container(wanted, resolve=True))
    base = _flat(OmegaConf.to_container(defaults, resolve=True))
    if set(old) - set(new):
        return False
    def default(k):  # concepts.<i>.<field> -> concepts.0.<field>: every concept has the same fields
        parts = k.split(".")
        return base.get(".".join([parts[0], "0", *parts[2:]]) if parts[0] == "concepts" else k, _MISSING)

    return all(old[k] == v if k in old else default(k) == v for k, v in new.items())


_MISSING = object()


def wanted_config(args: list[str]):
    """The config a method's training run with these overrides will record (steps scaled as ``train.run`` does)."""
    from ace_lightning.config import load_config, scale_steps

    return scale_steps(load_config(args))


def train_all(cfg: CompareConfig, out: Path) -> dict[str, Path]:
    """Train (or reuse) every method, each in its own process (so that its peak memory is its own and a failing
    method is reported, not fatal to the others); returns method -> run folder of those that finished."""
    import subprocess

    from ace_lightning.config import load_config
    from ace_lightning.utils import say

    runs, defaults = {}, load_config([f"concept={cfg.concept}"])  # base.yaml's values (method ace adds none)
    for i, m in enumerate(cfg.methods, 1):
        args = [f"concept={cfg.concept}", f"method={m}", f"output_dir={out / 'runs'}", f"name={m}",
                "logger.wandb=false", "grid.enabled=false", "trainer.enable_progress_bar=false", "overwrite=true",
                *([f"model.path={cfg.model}"] if cfg.model else []), f"trainer.devices={cfg.devices}", *cfg.train,
                *cfg.per_method.get(m, [])]
        wanted = wanted_config(args)  # bad keys fail here, before any training
        run_dir = out / "runs" / m
        done = (run_dir / "adapter.safetensors").is_file() and (run_dir / "config.yaml").is_file()
        if done and same_run((run_dir / "config.yaml").read_text(), wanted, defaults):
            say(f"[{i}/{len(cfg.methods)}] {m}: reusing {run_dir} (same config)")
        else:
            (out / "runs").mkdir(parents=True, exist_ok=True)
            log = out / "runs" / f"{m}.log"
            say(f"[{i}/{len(cfg.methods)}] training {m} ... (its progress: {log})")
            with log.open("w") as fh:  # written as it goes, so a long training can be followed
                proc = subprocess.run([sys.executable, "-m", "ace_lightning.train", *args], stdout=fh,
                                      stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0:
                tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
                say(f"[{i}/{len(cfg.methods)}] {m} FAILED (exit {proc.returncode}): {tail[0]}; log in {log}; "
                    "compared without it")
                continue
        runs[m] = run_dir
    if not runs:
        raise ConfigError("no method finished training; see the logs in " + str(out / "runs"))
    return runs


def load_scores(bench_dir: Path) -> list[dict]:
    path = bench_dir / "scores.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the bench run did not finish")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def metric_on_rows(metric_cfg: dict, rows: list[dict]) -> dict[str, float]:
    """The suite's own metric set (``metric_cfg``: its config without scorer/tag) recomputed on ``rows``."""
    import torch

    m = build("bench_metric", metric_cfg)
    if not rows:
        return m.compute()
    outputs = {}
    if "pred" in rows[0]:
        outputs["pred"] = torch.tensor([r["pred"] for r in rows])
    if "probs" in rows[0]:
        outputs["probs"] = torch.tensor([r["probs"] for r in rows])
    if "clip_score" in rows[0]:
        outputs["clip_score"] = torch.tensor([r["clip_score"] for r in rows])
    m.update(outputs, torch.tensor([r["target"] for r in rows]), torch.tensor([r["group"] for r in rows]))
    return m.compute()


def bootstrap(metric_cfg: dict, rows: list[dict], n_boot: int, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals over prompts: prompts (all their seeds together) are resampled with replacement
    within each group, and the metric set recomputed on every resample."""
    by_prompt: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        by_prompt.setdefault((r["group"], r["index"]), []).append(r)
    groups: dict[int, list[list[dict]]] = {}
    for (g, _), rs in sorted(by_prompt.items()):
        groups.setdefault(g, []).append(rs)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        picked = []
        for prompts in groups.values():
            for j in rng.integers(0, len(prompts), len(prompts)):
                picked += prompts[j]
        for k, v in metric_on_rows(metric_cfg, picked).items():
            samples.setdefault(k, []).append(v)
    out = {}
    for k, vs in samples.items():
        a = np.array([v for v in vs if not math.isnan(v)])
        out[k] = (float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5))) if len(a) else (math.nan, math.nan)
    return out


def summarise(settings: dict, scores: list[dict], runs: dict[str, Path], n_boot: int) -> dict:
    """Per variant: every metric with its interval, and the cost columns of its training run."""
    table = {}
    variants = list(settings["variants"])
    for v in variants:
        entry = {"metrics": {}, "ci": {}, "cost": {}, "method": v}
        for m in settings["metrics"]:
            mcfg = {k: x for k, x in m.items() if k not in ("scorer", "tag")}
            if mcfg["name"] not in HEADLINE:
                continue
            tag = m.get("tag", "")
            rows = [r for r in scores if r["variant"] == v and r["tag"] == tag]
            prefix = f"{tag}/" if tag else ""
            point = metric_on_rows(mcfg, rows)
            ci = bootstrap(mcfg, rows, n_boot) if n_boot else {}
            entry["metrics"].update({prefix + k: x for k, x in point.items()})
            entry["ci"].update({prefix + k: x for k, x in ci.items()})
        if v in runs:
            mj = json.loads((runs[v] / "metrics.json").read_text())
            entry["cost"] = {k: mj["metrics"].get(k, math.nan) for k in COST}
            entry["config"] = (runs[v] / "config.yaml").read_text()
        table[v] = entry
    return table


def summarise_attacks(bench_dir: Path, settings: dict, table: dict, n_boot: int, seed: int = 0) -> list[str]:
    """Adds ``ASR_pre``, ``ASR_<attack>`` and ``ASR_any`` (percent) with 95 % intervals over prompts (all seeds of
    a prompt resampled together) to every variant of ``table``; returns the ASR column names (none when the bench
    ran no attack). Definitions: ``bench/attacks.py``."""
    from ace_lightning.bench.attacks import asr_columns, success_matrix

    tag = settings.get("attack_scorer_tag")
    if tag is None:
        return []
    names = list(settings.get("attacks", {}))
    scores = [s for s in load_scores(bench_dir) if s["tag"] == tag]
    path = bench_dir / "attack_scores.jsonl"
    attacked = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    attacked = [s for s in attacked if s["tag"] == tag]
    cols = asr_columns(names)
    rng = np.random.default_rng(seed)
    for v, e in table.items():
        keys = sorted({(s["index"], s["seed"]) for s in attacked if s["variant"] == v})
        if not keys:
            continue
        mat = np.array(success_matrix(scores, attacked, v, keys, names), dtype=float)  # (rows, columns)
        prompts = sorted({i for i, _ in keys})
        members = {p: [j for j, (i, _) in enumerate(keys) if i == p] for p in prompts}
        boots = []
        for _ in range(n_boot):
            pick = [j for p in rng.choice(prompts, len(prompts)) for j in members[int(p)]]
            boots.append(mat[pick].mean(0))
        for c, name in enumerate(cols):
            e["metrics"][name] = 100.0 * float(mat[:, c].mean())
            if boots:
                b = 100.0 * np.array([x[c] for x in boots])
                e["ci"][name] = (float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5)))
    return cols


def plot_asr(table: dict, settings: dict, path: Path) -> Path | None:
    """The headline number against ``ASR_any`` (the concept back under any attack), one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = headline(settings)
    pts = [(v, e) for v, e in table.items() if "ASR_any" in e["metrics"]]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for v, e in pts:
        x, y = e["metrics"]["ASR_any"], e["metrics"].get(head, math.nan)
        xl, xh = e["ci"].get("ASR_any", (x, x))
        yl, yh = e["ci"].get(head, (y, y))
        ax.errorbar([x], [y], xerr=[[max(0.0, x - xl)], [max(0.0, xh - x)]], yerr=[[max(0.0, y - yl)], [max(0.0, yh - y)]],
                    fmt="o", capsize=3)
        ax.annotate(v, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("ASR under any attack (%, lower is better)")
    return _save_plot(fig, ax, settings, head, path)


def _save_plot(fig, ax, settings: dict, head: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from ace_lightning.utils import atomic_save

    ax.set_ylabel(f"{head} (%)")
    ax.set_title(f"{settings['suite']}: erased {erased_label(settings['erased'])}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def erased_label(erased: list[str] | None, show: int = 4) -> str:
    """The erased classes for a title: all of them, or the first ``show`` and how many in all."""
    erased = list(erased or [])
    if len(erased) <= show:
        return ", ".join(erased)
    return f"{len(erased)} classes ({', '.join(erased[:show])}, ...)"


def headline(settings: dict) -> str:
    m = next(m for m in settings["metrics"] if m["name"] in HEADLINE)
    return (f"{m['tag']}/" if m.get("tag") else "") + HEADLINE[m["name"]]


def _fmt(x: float, ci: tuple[float, float] | None = None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    s = f"{x:.1f}"
    return s + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci and not math.isnan(ci[0]) else "")


def markdown(table: dict, settings: dict, command: str) -> str:
    head = headline(settings)
    prefix = head.rsplit("/", 1)[0] + "/" if "/" in head else ""
    keys = [head] + [prefix + k for k in ("Acc_e", "Acc_s", "Acc_g", "Acc_e_mod", "Acc_s_mod", "Acc_g_mod", "Acc_look",
                                        "CS_e", "CS_s")]
    keys += sorted({k for e in table.values() for k in e["metrics"] if k.startswith("ASR_")},
                   key=lambda k: (k != "ASR_pre", k == "ASR_any", k))  # attacks: pre first, any last
    keys = [k for k in keys if any(k in e["metrics"] for e in table.values())]
    cols = keys + ["adapt s", "UNet fwd", "UNet bwd", "peak RSS MiB"]
    lines = [f"# compare: suite `{settings['suite']}`, erased {erased_label(settings['erased'], 20)}", "", f"`{command}`", "",
             "| method | " + " | ".join(f"`{c}`" if c in keys else c for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for v, e in table.items():
        cells = [_fmt(e["metrics"].get(k, math.nan), e["ci"].get(k)) for k in keys]
        c = e.get("cost", {})
        cells += [f"{c.get(k, math.nan):.1f}" if c else "-" for k in COST[:1]]
        cells += [f"{c.get(k, math.nan):.0f}" if c else "-" for k in COST[1:]]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    n_img = {v: e["metrics"].get((prefix or "") + "n_images", math.nan) for v, e in table.items()}
    lines += ["", f"Percent; 95 % bootstrap intervals over prompts (resampled within each group). Images per variant: "
              f"{next(iter(n_img.values())):.0f}. Sampler {settings['sampler']}, seeds {settings['seeds']}. "
              "Cost: adaptation seconds (data preparation + closed form + fine-tuning, 2 CPU cores unless stated), "
              "UNet forward and backward samples (one image through the UNet once) of the whole run (latent generation included), peak RSS."]
    return "\n".join(lines) + "\n"


def plot(table: dict, settings: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = headline(settings)
    pts = [(v, e) for v, e in table.items() if e.get("cost")]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for v, e in pts:
        x, y = max(e["cost"]["cost/adapt_seconds"], 1e-2), e["metrics"].get(head, math.nan)
        lo, hi = e["ci"].get(head, (y, y))
        ax.errorbar([x], [y], yerr=[[max(0.0, y - lo)], [max(0.0, hi - y)]], fmt="o", capsize=3)
        ax.annotate(v, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("adaptation seconds (log)")
    return _save_plot(fig, ax, settings, head, path)


def method_grid(bench_dir: Path, scores: list[dict], variants: list[str], path: Path, n: int = 4) -> Path | None:
    """One row per variant, the same erased and retained (prompt, seed) pairs in every row."""
    import torch
    from PIL import Image, ImageDraw

    from ace_lightning.bench.generation import load_png
    from ace_lightning.utils import atomic_save

    first = [r for r in scores if r["variant"] == variants[0]]
    pick, seen = [], set()
    for g, key in ((0, "index"), (1, "target")):  # erased: distinct prompts; retained: distinct classes
        chosen = []
        for r in first:
            if r["group"] == g and (g, r[key]) not in seen and len(chosen) < n:
                seen.add((g, r[key]))
                chosen.append((r["index"], r["seed"]))
        pick += chosen
    files = {p.name: p for p in (bench_dir / "images" / variants[0]).glob("*.png")}
    names_ = [next((f for f in files if f"-p{i:05d}-s{s}." in f), None) for i, s in pick]
    names_ = [f for f in names_ if f]
    if not names_:
        return None
    tiles = [[load_png(bench_dir / "images" / v / f) for f in names_] for v in variants]
    h, w = tiles[0][0].shape[-2:]
    scale = max(1, 96 // max(h, w))
    ch, cw, label = h * scale, w * scale, 140
    canvas = Image.new("RGB", (label + len(names_) * (cw + 4), 16 + len(variants) * (ch + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((label, 2), "erased prompts | retained classes (same seeds in every row)", fill="black")
    for i, v in enumerate(variants):
        y = 16 + i * (ch + 4)
        draw.text((2, y + ch // 2 - 6), v[:22], fill="black")
        for j, img in enumerate(tiles[i]):
            arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(arr).resize((cw, ch), Image.NEAREST), (label + j * (cw + 4), y))
    atomic_save(path, lambda tmp: canvas.save(tmp, format="PNG"))
    return path


def drop_stale_images(bench_dir: Path, runs: dict[str, Path]) -> list[str]:
    """Delete the bench images of every method whose adapter file is not the one they were generated with (it was
    retrained since): compare owns its bench folder, and the bench refuses to mix settings in a folder. Returns the
    methods whose images were dropped; the others are reused."""
    import shutil

    from ace_lightning.utils import file_digest, say

    dropped = []
    for m, run in runs.items():
        gen = bench_dir / "images" / m / "generation.json"
        if gen.is_file() and json.loads(gen.read_text()).get("adapter_sha256") != file_digest(run / "adapter.safetensors"):
            shutil.rmtree(gen.parent)
            dropped.append(m)
    if dropped:
        say(f"{', '.join(dropped)}: adapter changed since the last comparison, their images are generated again")
    return dropped


def main(argv: list[str] | None = None) -> dict:
    from ace_lightning.bench.run import main as bench_main
    from ace_lightning.config import concept_names
    from ace_lightning.method.adapter import concepts_slug
    from ace_lightning.utils import (
        atomic_write_json,
        atomic_write_text,
        open_wandb_run,
        quiet_known_notices,
        say,
    )

    quiet_known_notices()
    argv = sys.argv[1:] if argv is None else argv
    cfg = with_suite_model(parse_args(argv))
    out = Path(cfg.out or Path("outputs") / "compare" / cfg.suite / concepts_slug(concept_names(cfg.concept)))
    t0 = time.perf_counter()
    runs = train_all(cfg, out)
    say(f"generating and scoring {len(runs)} methods + base on {cfg.suite} ...")
    adapters = ",".join(str(r / "adapter.safetensors") for r in runs.values())
    bench_dir = out / "bench"
    drop_stale_images(bench_dir, runs)
    bench_main([f"suite={cfg.suite}", f"adapter={adapters}", f"out={bench_dir}", "run=compare", "logger=none",
                f"devices={cfg.devices}", *([f"model={cfg.model}"] if cfg.model else []), *cfg.bench])
    settings = json.loads((bench_dir / "metrics.json").read_text())["settings"]
    scores = load_scores(bench_dir)
    say(f"bootstrap ({cfg.boot} resamples) ...")
    table = summarise(settings, scores, runs, cfg.boot)
    summarise_attacks(bench_dir, settings, table, cfg.boot)
    command = "make compare " + " ".join(argv)
    result = {"suite": cfg.suite, "concept": cfg.concept, "methods": cfg.methods, "headline": headline(settings),
              "table": table, "settings": settings, "command": command, "seconds": time.perf_counter() - t0}
    atomic_write_json(out / "compare.json", result)
    atomic_write_text(out / "compare.md", markdown(table, settings, command))
    plot(table, settings, out / "compare.png")
    plot_asr(table, settings, out / "compare_asr.png")
    method_grid(bench_dir, scores, list(settings["variants"]), out / "grid.png")
    if cfg.logger == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        wrun = open_wandb_run("ace_lightning-compare", f"{cfg.suite}-{cfg.concept}", out, stepped=False)
        if wrun is not None:
            import wandb

            head = headline(settings)
            cols = ["method", head, "ci_low", "ci_high", *COST]
            data = [[v, e["metrics"].get(head), *e["ci"].get(head, (None, None)), *[e["cost"].get(k) for k in COST]]
                    for v, e in table.items() if e.get("cost")]
            wrun.log({"compare/table": wandb.Table(columns=cols, data=data),
                      **{f"compare/{n}": wandb.Image(str(out / n)) for n in ("compare.png", "compare_asr.png", "grid.png")
                         if (out / n).is_file()}})
            wrun.finish()
    elif cfg.logger != "none":
        raise ConfigError(f"logger must be wandb or none, got {cfg.logger!r}")
    print((out / "compare.md").read_text())
    say(f"compare outputs in {out}")
    return result


def cli() -> None:
    from ace_lightning.utils import run_cli

    run_cli(main)


if __name__ == "__main__":
    cli()
