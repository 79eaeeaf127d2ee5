"""Benchmark suites as data: `benchmarks/suites/<name>.yaml` -> a `Suite` -> prompt rows.

A suite file names a prompt source (registered kind ``"prompt_source"``: ``classes`` or ``csv``), the
sampler settings, the seeds, and a list of metric sets, each with its scorer (kinds ``"bench_metric"``
and ``"scorer"``). Every prompt row gets a stable index within the suite (independent of which rows a
run selects) and its own seed, so the image of (suite, index, seed) is the same in every run.
"""
from __future__ import annotations

import csv
import random
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ace_lightning.bench.metrics import GROUPS
from ace_lightning.bench.scorers import ClassInfo
from ace_lightning.registry import ConfigError, build, register
from ace_lightning.utils import read_name_list

SUITES_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "suites"

SUITE_KEYS = {  # key -> what it is (an unknown key in a suite file is an error)
    "name": "suite name (used in image file names and the output folder)",
    "description": "one line",
    "prompts": "prompt source: {name: classes | csv, ...}",
    "sampler": "{scheduler, steps, guidance, eta}",
    "images_per_prompt": "images per prompt (seeds seed .. seed + n - 1)",
    "seed": "first seed",
    "batch_size": "generation and scoring batch size",
    "metrics": "list of {name: <metric set>, tag: <optional>, scorer: {name: <scorer>, ...}, ...}",
    "grid": "{prompts: how many erased prompts to show in the base-vs-erased grid}",
    "model": "default model (null = ToyWorld)",
    "attacks": "{<attack>: {budget keys}}: the suite's budgets for attacks=<a,b> (defaults: each attack's SD-scale ones)",
}


@dataclass
class PromptRow:
    """One image to generate and score."""

    suite: str
    index: int  # stable prompt index within the suite
    prompt: str
    seed: int
    label: str = ""  # class name ("" when the suite has no classes)
    target: int = -1  # class index in the suite's class list (-1: none)
    group: str = "other"  # one of metrics.GROUPS
    ref: str | None = None  # reference image path (FID)
    variant: str = "base"  # which model generated it: "base" or an adapter's name
    attack: str = ""  # the attack that made its prompt ("" = the suite's own prompt)
    restart: int = 0  # the attack's restart / candidate number

    @property
    def group_id(self) -> int:
        return GROUPS.index(self.group)

    @property
    def image_name(self) -> str:
        tail = f"-{self.attack}{self.restart}" if self.attack else ""
        return f"{self.suite}-p{self.index:05d}-s{self.seed}{tail}.png"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Selection:
    """Run-time choices that select rows (from the run's key=value overrides)."""

    erased: list[str] | None = None  # erased classes (default: the suite's, or the adapters' concepts)
    classes: list[str] | None = None  # generate only these classes (zero-shot stays over all of them)
    templates: int | None = None  # use only the first n templates
    limit: int | None = None  # only the first n prompts (csv suites)
    csv: str | None = None  # the prompt CSV (csv suites)
    images_per_prompt: int = 1
    seed: int = 0


def draw_erased(names: list[str], n: int, seed: int = 0, n_retained: int | None = None) -> tuple[list[str], list[str]]:
    """``n_erased=n``: (erased, retained) = the first ``n`` of ``names`` in the random order fixed by ``seed`` and
    the rest, or only the last ``n_retained`` of that order. Nested: a smaller n's erased set is a prefix of a
    larger one's, and the ``n_retained`` retained classes are the same for every n (a curve over n measures them on
    the same classes). ConfigError unless at least one class stays retained."""
    if len(set(names)) != len(names):
        raise ConfigError(f"class names repeat: {sorted({x for x in names if names.count(x) > 1})}")
    if not 1 <= n < len(names):
        raise ConfigError(f"n_erased={n}: the suite has {len(names)} classes; give 1 <= n_erased < {len(names)}")
    if n_retained is not None and not 1 <= n_retained <= len(names) - n:
        raise ConfigError(f"n_retained={n_retained}: {len(names) - n} classes are left after n_erased={n}")
    order = random.Random(seed).sample(list(names), len(names))
    return order[:n], order[n:] if n_retained is None else order[len(names) - n_retained :]


# ---- prompt sources --------------------------------------------------------------------------------
@register("prompt_source", "classes")
class ClassPrompts:
    """Prompts ``template.format(name)`` for every class, its synonyms and every template.

    Classes come from exactly one of: ``classes`` (inline ``{name: [synonyms]}``), ``class_source`` (a
    registered function, e.g. ``toyworld_shapes``), or ``erased_file`` + ``retained_file`` (one name per
    line; the classes are their union and the erased file gives the default erased set).
    Groups: an erased class's own name -> ``erased``, its synonyms -> ``synonym``; other classes ->
    ``retained`` (their synonyms -> ``other``, generated only with ``retained_synonyms: true``).
    ``described_by`` (a registered class source: class -> phrases describing it, e.g. a character's look) adds
    group ``described``: an erased class's descriptions in the plain templates, which should still be drawn.

    ``modifier_templates`` (e.g. ``"a {color} {style} {}"``) with ``modifiers`` (slot -> words) add the same
    groups with modifier words before the class word (``erased_mod``, ``synonym_mod``, ``retained_mod``): each
    (phrase, template) row draws its slot words with a generator seeded by the row's index, so the prompts are
    fixed for a suite whatever is selected. ``templates=n`` also keeps the first n modifier templates.
    """

    def __init__(self, templates: list[str], classes: dict[str, list[str]] | None = None,
                 class_source: str | None = None, erased_file: str | None = None, retained_file: str | None = None,
                 erased: list[str] | None = None, synonyms: bool = True, retained_synonyms: bool = False,
                 modifier_templates: list[str] | None = None, modifiers: dict[str, list[str]] | None = None,
                 described_by: str | None = None, base_dir: str = ".") -> None:
        given = [x is not None for x in (classes, class_source, erased_file)]
        if sum(given) != 1:
            raise ConfigError("prompts: give exactly one of classes, class_source, erased_file(+retained_file)")
        if erased_file is not None:
            base = Path(base_dir)
            er = read_name_list(base / erased_file)
            re_ = read_name_list(base / retained_file) if retained_file else []
            dup = sorted(set(er) & set(re_))
            if dup:
                raise ConfigError(f"names in both the erased and the retained list: {dup}")
            classes, erased = {n: [] for n in er + re_}, (erased if erased is not None else er)
        elif class_source is not None:
            classes = build("class_source", class_source)
        self.classes: dict[str, list[str]] = {str(k): [str(s) for s in (v or [])] for k, v in classes.items()}
        self.templates = list(templates)
        self.default_erased = list(erased or [])
        self.synonyms, self.retained_synonyms = synonyms, retained_synonyms
        self.modifier_templates = list(modifier_templates or [])
        self.modifiers = {str(k): [str(w) for w in v] for k, v in (modifiers or {}).items()}
        for tmpl in self.modifier_templates:
            slots = [f for _, f, _, _ in string.Formatter().parse(tmpl) if f is not None]
            unknown = sorted({f for f in slots if f} - set(self.modifiers))
            if unknown or "" not in slots:
                raise ConfigError(f"modifier template {tmpl!r}: needs one {{}} for the class and slots from "
                                  f"modifiers {sorted(self.modifiers)}" + (f"; unknown slots {unknown}" if unknown else ""))
            empty = sorted(f for f in slots if f and not self.modifiers[f])
            if empty:
                raise ConfigError(f"modifiers {empty} have no words")
        self._check(self.default_erased)
        # a class source giving each class's look in words: an erased class's descriptions form group "described"
        self.descriptions = {str(k): [str(d) for d in v] for k, v in build("class_source", described_by).items()} \
            if described_by else {}
        missing = sorted(set(self.classes) - set(self.descriptions)) if described_by else []
        if missing:
            raise ConfigError(f"described_by {described_by!r} has no description for {missing}")

    def _check(self, names: list[str]) -> None:
        bad = [n for n in names if n not in self.classes]
        if bad:
            raise ConfigError(f"unknown class(es) {bad}; valid: {list(self.classes)}")

    def class_info(self) -> ClassInfo:
        return ClassInfo(names=list(self.classes), texts=list(self.classes))

    def resolve_erased(self, erased: list[str] | None) -> list[str]:
        out = self.default_erased if erased is None else erased
        self._check(out)
        return list(out)

    def rows(self, suite: str, sel: Selection) -> list[PromptRow]:
        if sel.csv is not None or sel.limit is not None:
            raise ConfigError(f"suite {suite!r} builds prompts from classes; csv= and limit= do not apply")
        erased = set(self.resolve_erased(sel.erased))
        wanted = set(sel.classes) if sel.classes else None
        if wanted:
            self._check(sorted(wanted))
        n_templates = sel.templates or max(len(self.templates), len(self.modifier_templates))
        rows, index = [], 0
        # plain templates first, then modifier templates: the plain rows keep their indices (and image names)
        for templates, mod in ((self.templates, ""), (self.modifier_templates, "_mod")):
            for target, (name, syns) in enumerate(self.classes.items()):
                for j, phrase in enumerate([name] + (syns if self.synonyms else [])):
                    is_syn = j > 0
                    group = ("synonym" if is_syn else "erased") if name in erased else ("other" if is_syn else "retained")
                    for t_i, tmpl in enumerate(templates):
                        idx, index = index, index + 1  # counted over everything: stable across selections
                        if t_i >= n_templates or (wanted is not None and name not in wanted):
                            continue
                        if group == "other" and not self.retained_synonyms:
                            continue
                        words = {}
                        if mod:
                            rng = random.Random(f"modifiers/{idx}")
                            words = {k: rng.choice(v) for k, v in sorted(self.modifiers.items())}
                        rows += [PromptRow(suite, idx, tmpl.format(phrase, **words), sel.seed + k, name, target,
                                           group + mod) for k in range(sel.images_per_prompt)]
        # the erased classes' looks in words, after everything else (the rows above keep their indices)
        for target, name in enumerate(self.classes):
            for phrase in self.descriptions.get(name, []):
                for t_i, tmpl in enumerate(self.templates):
                    idx, index = index, index + 1
                    if name in erased and t_i < n_templates and (wanted is None or name in wanted):
                        rows += [PromptRow(suite, idx, tmpl.format(phrase), sel.seed + k, name, target, "described")
                                 for k in range(sel.images_per_prompt)]
        return rows


@register("prompt_source", "csv")
class CsvPrompts:
    """Prompts from a user-given CSV (``csv=`` at run time): I2P, COCO captions, ...

    ``seed_column`` (a name, or candidate names: the first present is used) gives each prompt its own seed
    (I2P's ``evaluation_seed``), else run seeds are used;
    ``ref_column`` + ``ref_dir`` give a reference image per prompt (COCO, for FID).
    """

    def __init__(self, prompt_column: str = "prompt", seed_column: str | list[str] | None = None, ref_column: str | None = None,
                 ref_dir: str | None = None, missing: str = "this suite needs a prompt CSV: pass csv=<path>",
                 base_dir: str = ".") -> None:
        self.prompt_column, self.seed_column = prompt_column, seed_column
        self.ref_column, self.ref_dir, self.missing = ref_column, ref_dir, missing

    def class_info(self) -> None:
        return None

    def resolve_erased(self, erased: list[str] | None) -> list[str]:
        return list(erased or [])

    def rows(self, suite: str, sel: Selection) -> list[PromptRow]:
        if not sel.csv:
            raise ConfigError(f"suite {suite!r} refuses to run without its CSV: {self.missing}")
        path = Path(sel.csv).expanduser()
        if not path.is_file():
            raise ConfigError(f"suite {suite!r}: CSV {path} not found. {self.missing}")
        if sel.classes or sel.templates:
            raise ConfigError(f"suite {suite!r} reads prompts from a CSV; classes= and templates= do not apply")
        with open(path, newline="", encoding="utf-8") as f:
            table = list(csv.DictReader(f))
        if table and self.prompt_column not in table[0]:
            raise ConfigError(f"{path}: no column {self.prompt_column!r}; columns: {list(table[0])}")
        cands = [self.seed_column] if isinstance(self.seed_column, str) else list(self.seed_column or [])
        seed_col = next((c for c in cands if table and c in table[0]), None)
        rows = []
        for i, rec in enumerate(table[: sel.limit] if sel.limit else table):
            ref = None
            if self.ref_column:
                ref = str(Path(self.ref_dir or path.parent) / rec[self.ref_column])
            seeds = ([int(float(rec[seed_col])) + k for k in range(sel.images_per_prompt)] if seed_col
                     else [sel.seed + k for k in range(sel.images_per_prompt)])
            rows += [PromptRow(suite, i, rec[self.prompt_column], s, group="other", ref=ref) for s in seeds]
        return rows


# ---- the suite -------------------------------------------------------------------------------------
@dataclass
class Suite:
    name: str
    path: str
    prompts: Any  # a built prompt source
    prompts_cfg: dict
    sampler: dict
    images_per_prompt: int
    seed: int
    batch_size: int
    metrics: list[dict]
    description: str = ""
    grid: dict = field(default_factory=lambda: {"prompts": 4})
    model: str | None = None
    attacks: dict = field(default_factory=dict)  # attack name -> the suite's budget for it

    @property
    def classes(self) -> ClassInfo | None:
        return self.prompts.class_info()

    def rows(self, sel: Selection) -> list[PromptRow]:
        return self.prompts.rows(self.name, sel)


def suite_names() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_suite(name_or_path: str) -> Suite:
    """Load ``benchmarks/suites/<name>.yaml`` (or a YAML path) and build its prompt source."""
    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml"):
        p = SUITES_DIR / f"{name_or_path}.yaml"
        if not p.is_file():
            raise ConfigError(f"unknown suite {name_or_path!r}; valid: {', '.join(suite_names())} (or a .yaml path)")
    elif not p.is_file():
        raise ConfigError(f"suite file {p} not found")
    cfg = yaml.safe_load(p.read_text()) or {}
    bad = sorted(set(cfg) - set(SUITE_KEYS))
    if bad:
        raise ConfigError(f"{p}: unknown key(s) {bad}; valid keys: {sorted(SUITE_KEYS)}")
    for k in ("name", "prompts", "sampler", "metrics"):
        if k not in cfg:
            raise ConfigError(f"{p}: missing key {k!r} ({SUITE_KEYS[k]})")
    for m in cfg["metrics"]:
        if "name" not in m or "scorer" not in m:
            raise ConfigError(f"{p}: each metrics entry needs name and scorer; got {m}")
    pairs = [(m["name"], m.get("tag", "")) for m in cfg["metrics"]]
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"{p}: the same metric set twice with the same tag would overwrite its numbers: {pairs}")
    source = build("prompt_source", cfg["prompts"], base_dir=str(p.parent))
    return Suite(
        name=cfg["name"], path=str(p), prompts=source, prompts_cfg=dict(cfg["prompts"]), sampler=dict(cfg["sampler"]),
        images_per_prompt=int(cfg.get("images_per_prompt", 1)), seed=int(cfg.get("seed", 0)),
        batch_size=int(cfg.get("batch_size", 16)), metrics=list(cfg["metrics"]), description=cfg.get("description", ""),
        grid=dict(cfg.get("grid", {"prompts": 4})), model=cfg.get("model"), attacks=dict(cfg.get("attacks") or {}),
    )
