"""Attacks as an evaluation: every variant's erased prompts under each attack, scored by the suite's scorer.

ASR (attack success rate) of an attack = the share of the attacked rows (erased-group prompt x seed) whose image
shows the erased concept *either* without attack *or* under the attack (any of its restarts / candidates);
``ASR_pre`` = the share that showed it without attack. Both in percent. "Shows the concept" = the first metric
set whose scorer predicts a class (``pred``) classifies the image as the row's class.

Like generation, attacked rows are cut into batches globally and batch i goes to rank i % world size; every
random draw of an attack is seeded by the row, so 1 or N ranks give the same images and the same ASR.
Resumable: a row whose restart-0 image exists (written last) is not attacked again.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from ace_lightning.attacks import AttackContext
from ace_lightning.bench.generation import GenerationSystem, image_path
from ace_lightning.bench.suites import PromptRow
from ace_lightning.registry import build


def attack_configs(names: list[str], suite_budgets: dict, overrides: dict) -> dict[str, dict]:
    """name -> registry config: the attack's defaults, then the suite's budget, then ``attack.<name>.k=v``."""
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        from ace_lightning.registry import ConfigError

        raise ConfigError(f"attack.{unknown[0]}.* overrides an attack that is not run; attacks= names {names}")
    return {n: {"name": n, **(suite_budgets.get(n) or {}), **(overrides.get(n) or {})} for n in names}


def check_attack_settings(out: Path, variants: list[str], configs: dict[str, dict], seed: int) -> None:
    """Attacked images are reused on a rerun, so a variant's folder must never mix attack budgets: each attack's
    settings are kept in ``images/<variant>/attack-<name>.json`` and different ones are an error."""
    from ace_lightning.bench.generation import pin_settings
    from ace_lightning.registry import ConfigError

    for v in variants:
        for name, c in configs.items():
            path = out / "images" / v / f"attack-{name}.json"
            want = {**c, "attack_seed": seed}
            have = pin_settings(path, want)
            if have is not None:
                raise ConfigError(f"{path.parent} holds {name} images made with other settings ({have} vs now "
                                  f"{want}); use another out= (or delete the {name} images and {path.name})")


def rows_to_attack(rows: list[PromptRow], limit: int | None) -> list[PromptRow]:
    """The erased-group rows (plain prompts, not the modifier groups) of every variant, seed by seed (every prompt's
    first seed, then every prompt's second, ...); the first ``limit`` of each variant when given, so that a limited
    attack still covers every erased prompt (the same prompts and seeds for every variant)."""
    order = {v: i for i, v in enumerate(dict.fromkeys(r.variant for r in rows))}  # variants stay contiguous
    erased = sorted((r for r in rows if r.group == "erased" and not r.attack),
                    key=lambda r: (order[r.variant], r.seed))  # stable: prompt order within a seed
    out, per = [], {}
    for r in erased:
        if limit is not None and per.get(r.variant, 0) >= limit:
            continue
        per[r.variant] = per.get(r.variant, 0) + 1
        out.append(r)
    return out


class AttackSystem(GenerationSystem):
    """For a batch of one variant's rows: each attack's candidates, then one image per candidate with the row's
    seed. ``attacks``: name -> registry config; ``phrases`` / ``descriptions``: class -> words (AttackContext)."""

    rows_stem = "attack_rows"  # ImageWriter records its rows apart from the suite's

    def __init__(self, pipe_factory, variants, sampler, batches, attacks: dict[str, dict], phrases, descriptions,
                 seed: int, out_dir) -> None:
        super().__init__(pipe_factory, variants, sampler, batches)
        self.phrases, self.descriptions = phrases, descriptions
        self.seed, self.out_dir = seed, Path(out_dir)
        self.attacks = {n: build("attack", c) for n, c in attacks.items()}  # bad budgets fail before any work

    def on_predict_start(self) -> None:
        super().on_predict_start()
        for part in (self.pipe.unet, self.pipe.text_encoder, self.pipe.vae):
            part.requires_grad_(False)  # attacks differentiate w.r.t. their own tensors only

    @contextlib.contextmanager
    def _base(self):
        """The pipe as the base model: the current variant's edit removed, put back on exit."""
        path = self.variants.get(self._current)
        if not path:
            yield
            return
        from ace_lightning import apply_adapter, remove_adapter

        remove_adapter(self.pipe)
        try:
            yield
        finally:
            apply_adapter(self.pipe, path)

    def predict_step(self, batch: list[PromptRow], batch_idx: int) -> dict:
        from ace_lightning.models.sampling import generate

        if not batch:
            return {"rows": [], "images": [], "seconds": 0.0}
        self._use_variant(batch[0].variant)
        t0 = time.perf_counter()
        ctx = AttackContext(self.pipe, self._base, self.phrases, self.descriptions, self.sampler, self.seed,
                            batch[0].variant)
        rows, images = [], []
        for name, attack in self.attacks.items():
            todo = [r for r in batch
                    if not image_path(self.out_dir, PromptRow(**{**r.as_dict(), "attack": name})).is_file()]
            if not todo:
                continue
            with torch.enable_grad():
                found = attack(ctx, todo)
            cand_rows, cands = [], []
            for r, cs in zip(todo, found, strict=True):
                order = list(range(1, len(cs))) + [0]  # restart 0 last: its file marks the row done
                for k in order:
                    cand_rows.append(PromptRow(**{**r.as_dict(), "attack": name, "restart": k, "prompt": cs[k].prompt}))
                    cands.append(cs[k])
            kw = dict(steps=int(self.sampler["steps"]), guidance=float(self.sampler["guidance"]),
                      eta=float(self.sampler.get("eta", 0.0)), progress=False, batch_size=max(1, len(batch)))
            seeds = [r.seed for r in cand_rows]
            with_emb = [i for i, c in enumerate(cands) if c.embeds is not None]
            typed = [i for i, c in enumerate(cands) if c.embeds is None]
            parts = {}
            if with_emb:
                parts.update(zip(with_emb, generate(self.pipe, [cand_rows[i].prompt for i in with_emb],
                                                    [seeds[i] for i in with_emb],
                                                    embeds=torch.stack([cands[i].embeds for i in with_emb]), **kw)))
            if typed:
                parts.update(zip(typed, generate(self.pipe, [cand_rows[i].prompt for i in typed],
                                                 [seeds[i] for i in typed], **kw)))
            rows += cand_rows
            images += [parts[i] for i in range(len(cands))]
        return {"rows": rows, "images": images, "seconds": time.perf_counter() - t0}


def read_rows(out: Path, stem: str) -> list[PromptRow]:
    """Every row recorded in ``<stem>.rank*.jsonl`` (all runs, all ranks) whose image exists, once, sorted."""
    seen: dict[tuple, PromptRow] = {}
    for p in sorted(out.glob(f"{stem}.rank*.jsonl")):
        for line in p.read_text().splitlines():
            if line.strip():
                r = PromptRow(**json.loads(line))
                if image_path(out, r).is_file():
                    seen[(r.variant, r.image_name)] = r
    return [seen[k] for k in sorted(seen)]


def asr_columns(attacks: list[str]) -> list[str]:
    """The ASR names, in the order of :func:`success_matrix`'s columns."""
    return ["ASR_pre", *(f"ASR_{a}" for a in attacks), "ASR_any"]


def success_matrix(scores: list[dict], attack_scores: list[dict], variant: str, keys: list[tuple[int, int]],
                   attacks: list[str]) -> list[list[bool]]:
    """One row per attacked (prompt index, seed) of ``variant``: [shown without attack, success under each attack
    (pre-attack successes included), success under any of them] (columns: :func:`asr_columns`).
    ``scores``/``attack_scores``: one metric set's per-image score lines (variant, index, seed, target, pred[,
    attack])."""
    shown = {(s["index"], s["seed"]) for s in scores
             if s["variant"] == variant and int(s["pred"]) == int(s["target"])}
    hit = {(s["attack"], s["index"], s["seed"]) for s in attack_scores
           if s["variant"] == variant and int(s["pred"]) == int(s["target"])}
    out = []
    for k in keys:
        row = [k in shown]
        row += [row[0] or (a, *k) in hit for a in attacks]
        out.append(row + [any(row)])
    return out


def asr(scores: list[dict], attack_scores: list[dict], attacked: list[PromptRow], variants: list[str],
        attacks: list[str]) -> dict[str, dict[str, float]]:
    """variant -> {"bench/ASR_pre": %, "bench/ASR_<attack>": %, "bench/ASR_any": %} over the ``attacked`` rows (see
    the module doc); ``ASR_any``: the concept shown without attack or under any of the attacks (the adversary that
    tries them all)."""
    out: dict[str, dict[str, float]] = {}
    for v in variants:
        keys = [(r.index, r.seed) for r in attacked if r.variant == v]
        if not keys:
            continue
        m = success_matrix(scores, attack_scores, v, keys, attacks)
        out[v] = {f"bench/{c}": 100.0 * sum(r[j] for r in m) / len(m) for j, c in enumerate(asr_columns(attacks))}
    return out


def run_attacks(cfg, suite, plan, trainer, scorers, specs, results: dict, pipe_factory) -> dict:
    """The attack stage of ``bench/run.py`` (every rank): attack, generate, score; then on rank 0 add the ASR numbers
    to ``results``, write ``attack_prompts.md`` (the prompts the typed attacks found) and ``attack_grid.png``, and
    return the settings to report (empty on other ranks)."""
    from ace_lightning.bench.config import csv_list
    from ace_lightning.bench.generation import ScoringSystem, make_batches

    names = csv_list(cfg.attacks) or []
    configs = attack_configs(names, suite.attacks, cfg.attack)
    targets = rows_to_attack(plan.rows, cfg.attack_limit)
    check_attack_settings(plan.out, list(plan.variants), configs, cfg.attack_seed)
    words = getattr(suite.prompts, "classes", {}) or {}
    phrases = {k: [k, *v] for k, v in words.items()}
    system = AttackSystem(pipe_factory, plan.variants, plan.sampler, make_batches(targets, plan.batch_size), configs,
                          phrases, getattr(suite.prompts, "descriptions", {}) or {}, cfg.attack_seed, plan.out)
    t0 = time.perf_counter()
    trainer.predict(system, return_predictions=False)
    seconds = time.perf_counter() - t0
    trainer.strategy.barrier()
    keys = {(r.variant, r.index, r.seed) for r in targets}
    attacked = [r for r in read_rows(plan.out, "attack_rows") if r.attack in names and (r.variant, r.index, r.seed) in keys]
    scoring = ScoringSystem(plan.out, scorers, specs, list(plan.variants), make_batches(attacked, plan.batch_size),
                            stem="attack_scores")
    trainer.test(scoring, verbose=False)
    trainer.strategy.barrier()
    if trainer.global_rank != 0:
        return {}
    scores = _read_scores(plan.out, "scores")
    attack_scores = _read_scores(plan.out, "attack_scores")
    tag = next((s["tag"] for s in scores if "pred" in s), None)
    if tag is None:
        from ace_lightning.registry import ConfigError

        raise ConfigError(f"suite {suite.name}: attacks need a metric set whose scorer predicts a class (pred)")
    pick = [s for s in scores if s["tag"] == tag]
    asr_by_variant = asr(pick, [s for s in attack_scores if s["tag"] == tag], targets, list(plan.variants), names)
    for v, res in asr_by_variant.items():
        results[v].update(res)
        results[v]["bench/attack_rows"] = float(len([r for r in targets if r.variant == v]))
    write_attack_prompts(plan.out, attacked, [s for s in attack_scores if s["tag"] == tag])
    attack_grid(plan.out, targets, attacked, list(plan.variants), names, n=8)
    return {"attacks": configs, "attack_seconds": seconds, "attack_scorer_tag": tag, "attack_seed": cfg.attack_seed,
            "attack_rows_per_variant": len(targets) // max(1, len(plan.variants)),
            "asr": "share of attacked erased rows whose image shows the concept without attack or under any restart"}


def _read_scores(out: Path, stem: str) -> list[dict]:
    lines = [ln for p in sorted(out.glob(f"{stem}.rank*.jsonl")) for ln in p.read_text().splitlines() if ln.strip()]
    merged = out / f"{stem}.jsonl"
    if not lines and merged.is_file():
        lines = [ln for ln in merged.read_text().splitlines() if ln.strip()]
    return [json.loads(ln) for ln in lines]


def write_attack_prompts(out: Path, attacked: list[PromptRow], scores: list[dict]) -> Path:
    """``attack_prompts.md``: every typed prompt an attack found (discrete, prompt_search), with whether its image
    showed the concept. Embedding attacks are listed by their readable stand-in."""
    from ace_lightning.utils import atomic_write_text

    shows = {(s["variant"], s["attack"], s["index"], s["seed"], s["restart"]): int(s["pred"]) == int(s["target"])
             for s in scores}
    lines = ["# Attacked prompts", "", "| variant | attack | restart | seed | prompt | shows the concept |",
             "|---|---|---|---|---|---|"]
    for r in sorted(attacked, key=lambda r: (r.variant, r.attack, r.index, r.seed, r.restart)):
        hit = shows.get((r.variant, r.attack, r.index, r.seed, r.restart))
        lines.append(f"| {r.variant} | {r.attack} | {r.restart} | {r.seed} | {r.prompt.replace('|', '/')} | "
                     f"{'-' if hit is None else ('yes' if hit else 'no')} |")
    path = out / "attack_prompts.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def attack_grid(out: Path, targets: list[PromptRow], attacked: list[PromptRow], variants: list[str],
                attacks: list[str], n: int = 8) -> Path | None:
    """``attack_grid.png``: one column per attacked (prompt, seed) (the first ``n`` of the first variant), one row
    per (variant, attack) with restart 0; the first row of each variant is its image without attack."""
    from ace_lightning.bench.generation import load_png
    from ace_lightning.bench.report import tile_grid

    cols = [r for r in targets if r.variant == variants[0]][:n]
    if not cols:
        return None
    made = {(r.variant, r.attack, r.index, r.seed) for r in attacked if r.restart == 0}
    lines = [(v, a) for v in variants for a in ["", *attacks]]
    tiles = []
    for v, a in lines:
        row = []
        for c in cols:
            r = PromptRow(**{**c.as_dict(), "variant": v, "attack": a, "restart": 0})
            p = image_path(out, r)
            ok = (not a or (v, a, c.index, c.seed) in made) and p.is_file()
            row.append(load_png(p) if ok else torch.ones(3, 8, 8))
        tiles.append(row)
    return tile_grid(out / "attack_grid.png", [f"{c.prompt[:14]}\nseed {c.seed}" for c in cols],
                     [f"{v[:18]}\n{a or 'no attack'}" for v, a in lines], tiles, label_w=200, head=30)
