"""Per-class erasure evaluation on ToyWorld with the shipped classifier: bare, synonym and modifier prompts.

Held out from every training recipe: the phrasings (ToyWorld's held-out caption templates), the seeds, and the
modifier prompts (colour and style words before the noun, then a held-out frame). For each class (shape or
style) and group, the share of images the classifier reads as that class. Used by the end-to-end tests and by
``benchmarks/toy_generic_recipe.py``.
"""

from __future__ import annotations

import math

import torch

from ace_lightning.toyworld.captions import HELDOUT_TEMPLATES
from ace_lightning.toyworld.world import COLORS, SHAPES, STYLES

GROUPS = ("bare", "synonym", "modifier")
SEED0 = 50_000  # seeds no training recipe uses


def _cycle(xs, i):
    return xs[i % len(xs)]


def class_prompts(kind: str, name: str, group: str, n: int) -> list[str]:
    """``n`` prompts for class ``name`` (kind ``shape`` or ``style``) in ``group``."""
    colors, shapes = list(COLORS), list(SHAPES)
    styles = [s for s in STYLES if s != "plain"]
    out = []
    for i in range(n):
        frame = _cycle(HELDOUT_TEMPLATES, i)
        if kind == "shape":
            if group == "bare":
                phrase = name
            elif group == "synonym":
                phrase = _cycle(SHAPES[name], i)
            else:  # a colour and a style word before the noun
                phrase = f"{_cycle(colors, i)} {_cycle(styles, i // len(colors))} {name}"
        elif kind == "style":
            shape = _cycle(shapes, i * 3 + 1)
            if group == "bare":
                phrase = f"{name} {shape}"
            elif group == "synonym":
                phrase = f"{_cycle(STYLES[name], i)} {shape}"
            else:
                phrase = f"{_cycle(colors, i)} {name} {shape}"
        else:
            raise ValueError(f"kind must be shape or style, got {kind!r}")
        out.append(frame.format(phrase))
    return out


def classes(kind: str) -> list[str]:
    return list(SHAPES) if kind == "shape" else list(STYLES)


@torch.no_grad()
def evaluate(pipe, clf, kind: str, n: int = 8, steps: int = 20, guidance: float = 5.0, batch_size: int = 64,
             names: list[str] | None = None) -> dict[str, dict[str, float]]:
    """``{class: {group: share drawn as that class}}`` over ``n`` images per class and group (``plain`` has no
    synonym/modifier distinction worth testing, but is measured like the others)."""
    from ace_lightning.models.sampling import generate

    names = names or classes(kind)
    rows, keys = [], []
    for c in names:
        for g in GROUPS:
            ps = class_prompts(kind, c, g, n)
            rows += ps
            keys += [(c, g)] * len(ps)
    seeds = [SEED0 + i for i in range(len(rows))]
    imgs = generate(pipe, rows, seeds, steps, guidance, batch_size=batch_size, progress=False)
    pred = clf.predict(imgs)[kind]
    labels = clf.labels[kind]
    out: dict[str, dict[str, list[int]]] = {}
    for (c, g), p in zip(keys, pred.tolist()):
        out.setdefault(c, {}).setdefault(g, []).append(int(p == labels.index(c)))
    return {c: {g: sum(v) / len(v) for g, v in gs.items()} for c, gs in out.items()}


def summary(result: dict[str, dict[str, float]], erased: list[str]) -> dict[str, float]:
    """Worst cases: the highest share of an erased class, the lowest of a retained one, per group."""
    s = {}
    for g in GROUPS:
        er = [result[c][g] for c in erased if c in result]
        kept = [result[c][g] for c in result if c not in erased]
        s[f"erased_max/{g}"] = max(er) if er else math.nan
        s[f"retained_min/{g}"] = min(kept) if kept else math.nan
        s[f"retained_mean/{g}"] = sum(kept) / len(kept) if kept else math.nan
    return s


def table(base: dict, after: dict, erased: list[str]) -> str:
    """Markdown: one row per class, ``base → erased`` per group."""
    lines = ["| class | " + " | ".join(GROUPS) + " |", "|---|" + "---|" * len(GROUPS)]
    for c in base:
        cells = [f"{base[c][g]:.2f}→{after[c][g]:.2f}" for g in GROUPS]
        lines.append(f"| {c}{' (erased)' if c in erased else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
