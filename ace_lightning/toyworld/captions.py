"""Captions for ToyWorld images: training templates, held-out templates and evaluation prompts.

Training captions drop attributes at random, use shape/style synonyms interchangeably with the canonical
names, and teach the neutral words of `NEUTRALS` on the mixture they stand for ("a red shape" over any
shape, "a picture of someone" over any look), so an erased concept has a meaningful place to go.
HELDOUT_TEMPLATES never appear in training; they measure whether the model generalises the phrasing.
"""
from __future__ import annotations

import numpy as np

from .world import CHARACTERS, COLORS, NEUTRALS, SHAPES, STYLES

TRAIN_TEMPLATES = [
    "{}",
    "a {}",
    "a picture of a {}",
    "a drawing of a {}",
    "an image of a {}",
    "a photo of a {}",
    "a small {}",
    "one {}",
]
HELDOUT_TEMPLATES = [
    "a sketch showing a {}",
    "there is a {} here",
    "look at this {}",
    "my favourite {}",
]
CHARACTER_TEMPLATES = [
    "{}",
    "a picture of {}",
    "a drawing of {}",
    "an image of {}",
    "a photo of {}",
]
OBJECT_NEUTRALS = [NEUTRALS["object"], "object"]  # words that stand for "any shape"

P_COLOR, P_STYLE, P_SHAPE_WORD, P_SYNONYM = 0.75, 0.65, 0.85, 0.5


def describe(shape: str | None, color: str | None, style: str | None, rng: np.random.Generator,
             synonyms: bool = True) -> str:
    """'red striped circle'-like phrase; None drops an attribute (a missing shape becomes 'shape'/'object')."""
    words = []
    if color is not None:
        words.append(color)
    if style is not None:
        words.append(_pick(style, STYLES[style], rng) if synonyms else style)
    if shape is None:
        words.append(str(rng.choice(OBJECT_NEUTRALS)))
    else:
        words.append(_pick(shape, SHAPES[shape], rng) if synonyms else shape)
    return " ".join(words)


def _pick(name: str, syns: list[str], rng: np.random.Generator) -> str:
    return name if rng.random() >= P_SYNONYM else str(rng.choice(syns))


def train_caption(shape: str, color: str, style: str, character: str | None, rng: np.random.Generator) -> str:
    """One random training caption for an image with this look (`character` set for a character render)."""
    if character is not None and rng.random() < 0.85:
        return str(rng.choice(CHARACTER_TEMPLATES)).format(character)
    if character is None and rng.random() < 0.04:  # "someone" = a random look, the person neutral
        return str(rng.choice(CHARACTER_TEMPLATES)).format(NEUTRALS["person"])
    phrase = describe(
        shape if rng.random() < P_SHAPE_WORD else None,
        color if rng.random() < P_COLOR else None,
        style if rng.random() < P_STYLE else None,
        rng,
    )
    return str(rng.choice(TRAIN_TEMPLATES)).format(phrase)


def attribute_prompts(n: int, seed: int = 0) -> list[tuple[str, tuple[str, str, str]]]:
    """n prompts 'a <colour> <style> <shape>' (canonical words), cycling through all looks."""
    looks = [(sh, c, st) for sh in SHAPES for c in COLORS for st in STYLES]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(looks))
    out = []
    for i in range(n):
        sh, c, st = looks[order[i % len(looks)]]
        out.append((f"a {c} {st} {sh}", (sh, c, st)))
    return out


def synonym_prompts(n: int) -> list[tuple[str, str]]:
    """n prompts naming a shape only by a synonym (in training templates): (prompt, canonical shape)."""
    pairs = [(syn, sh) for sh, syns in SHAPES.items() for syn in syns]
    return [(f"a picture of a {pairs[i % len(pairs)][0]}", pairs[i % len(pairs)][1]) for i in range(n)]


def heldout_prompts(n: int) -> list[tuple[str, str]]:
    """n prompts with held-out templates and canonical shape names: (prompt, shape)."""
    combos = [(t, sh) for t in HELDOUT_TEMPLATES for sh in SHAPES]
    return [(combos[i % len(combos)][0].format(combos[i % len(combos)][1]), combos[i % len(combos)][1])
            for i in range(n)]


def character_prompts(n: int) -> list[tuple[str, tuple[str, str, str]]]:
    """n character prompts 'a picture of <name>': (prompt, bound look)."""
    names = list(CHARACTERS)
    return [(f"a picture of {names[i % len(names)]}", CHARACTERS[names[i % len(names)]]) for i in range(n)]
