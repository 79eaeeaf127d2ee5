"""ToyWorld's cast: 154 invented character names, each bound to its own look (the celebrity analogue at scale).

The first four are the original ``CHARACTERS`` (the base build's, the toy-characters suite's). The other 150 were
drawn once by :func:`generate_cast` and are stored in ``assets/cast.json``, so that the names never depend on a
tokenizer or a random generator at import time; a test checks that the generator still draws the same file.

A name is two or three consonant-vowel syllables (pronounceable), splits into 2-3 tokens of CLIP's BPE (so it is
not one of the vocabulary's whole words, which cover common English) and contains no word of ToyWorld's own
vocabulary (it shares no meaning with a shape, colour, style or template word) and no BPE piece of the base
build's captions (:func:`base_pieces`): the cast stage of the build learns the names by training only their pieces'
token embeddings, so every prompt without a new name keeps its text embedding bit for bit. Every name gets a distinct look of
the 8 x 6 x 4 = 192: many differ from another character's in one attribute only, the hard cases of erasure.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from .world import CHARACTERS, COLORS, NEUTRALS, SHAPES, STYLES

CAST_FILE = Path(__file__).parent / "assets" / "cast.json"
N_NEW = 150  # names added to the original four
SEED = 13  # the draw of names and looks

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "pl",
           "tr", "sn", "th", "sh", "ch"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ee", "oo"]
_CODAS = ["", "", "", "n", "r", "x", "l", "m", "sk", "nd"]


def _toy_words() -> list[str]:
    """Every word ToyWorld's captions use (names excepted)."""
    words = [*COLORS, *NEUTRALS.values(), "object", "picture", "drawing", "image", "photo", "sketch", "small"]
    for table in (SHAPES, STYLES):
        for name, syns in table.items():
            words += [name, *(w for s in syns for w in s.split())]
    return words


def base_pieces(tokenizer) -> set[str]:
    """Every BPE piece of the base build's captions: ToyWorld's words, its templates and the original names. A new
    name uses none of them, so that learning it changes no prompt the base model was trained on."""
    from .captions import CHARACTER_TEMPLATES, HELDOUT_TEMPLATES, TRAIN_TEMPLATES

    text = [*_toy_words(), *CHARACTERS, *(t.replace("{}", " ") for t in
                                          (*TRAIN_TEMPLATES, *HELDOUT_TEMPLATES, *CHARACTER_TEMPLATES))]
    return {p for t in text for p in tokenizer.tokenize(t)}


def generate_cast(tokenizer, n_new: int = N_NEW, seed: int = SEED) -> dict[str, tuple[str, str, str]]:
    """The original characters plus ``n_new`` drawn names, name -> (shape, colour, style)."""
    rng = np.random.default_rng(seed)
    toy, base = _toy_words(), base_pieces(tokenizer)
    names: list[str] = []
    taken = set(CHARACTERS)
    while len(names) < n_new:
        syllables = int(rng.integers(2, 4))
        name = "".join(str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) for _ in range(syllables))
        name += str(rng.choice(_CODAS))
        pieces = tokenizer.tokenize(name)
        if (name in taken or not 5 <= len(name) <= 10 or not 2 <= len(pieces) <= 3 or base & set(pieces)
                or any(w in name for w in toy) or any(name in t or t in name for t in taken)):
            continue
        taken.add(name)
        names.append(name)
    used = set(CHARACTERS.values())
    looks = [(sh, c, st) for sh in SHAPES for c in COLORS for st in STYLES if (sh, c, st) not in used]
    order = rng.permutation(len(looks))[:n_new]
    return {**CHARACTERS, **{nm: looks[i] for nm, i in zip(names, order.tolist(), strict=True)}}


@lru_cache(maxsize=1)
def cast() -> dict[str, tuple[str, str, str]]:
    """name -> (shape, colour, style) of all 154 characters, the original four first."""
    raw = json.loads(CAST_FILE.read_text())
    return {k: tuple(v) for k, v in raw.items()}


def write_cast(tokenizer, path: Path = CAST_FILE) -> Path:
    path.write_text(json.dumps(generate_cast(tokenizer), indent=1) + "\n")
    return path
