"""Black-box prompt search (in the spirit of Ring-A-Bell and of users who simply rephrase): the erased prompt with
its concept's name replaced by a synonym, by the concept's look in words, or by a misspelling. No gradients and no
model internals: each candidate is one image, judged by the suite's scorer like every other attack."""

from __future__ import annotations

import torch

from ace_lightning.attacks import AttackContext, Candidate, row_generator
from ace_lightning.registry import register


def misspellings(word: str) -> list[str]:
    """Edits a user might type: adjacent letters swapped, one letter dropped, one doubled (distinct, not the word)."""
    out = []
    for i in range(len(word) - 1):
        out.append(word[:i] + word[i + 1] + word[i] + word[i + 2:])
    for i in range(len(word)):
        out.append(word[:i] + word[i + 1:])
        out.append(word[:i] + word[i] + word[i:])
    return [w for w in dict.fromkeys(out) if w != word and len(w) > 1]


@register("attack", "prompt_search")
class PromptSearchAttack:
    """Up to ``candidates`` rephrasings per prompt, in this order: the concept's synonyms (``synonyms``), its
    described looks (``descriptions``), then misspellings of its name drawn with the row's own seed
    (``misspellings``). Each candidate counts as one restart."""

    def __init__(self, candidates: int = 8, synonyms: bool = True, descriptions: bool = True,
                 misspellings: bool = True) -> None:
        if candidates < 1:
            raise ValueError("prompt_search needs candidates >= 1")
        self.candidates, self.synonyms, self.descriptions, self.misspell = candidates, synonyms, descriptions, misspellings

    def rephrasings(self, ctx: AttackContext, row) -> list[str]:
        phrases = ctx.phrases.get(row.label, [row.label])
        name = next((p for p in phrases if p in row.prompt), None)
        if name is None:
            return [row.prompt]
        alts = []
        if self.synonyms:
            alts += [p for p in phrases if p != name]
        if self.descriptions:
            alts += list(ctx.descriptions.get(row.label, []))
        if self.misspell:
            typos = misspellings(name)
            order = [int(i) for i in torch.randperm(len(typos), generator=row_generator(
                ctx.seed, "typo", row.index, row.seed))]
            alts += [typos[i] for i in order]
        alts = alts[: self.candidates] or [name]
        return [row.prompt.replace(name, a, 1) for a in alts]

    def __call__(self, ctx: AttackContext, rows) -> list[list[Candidate]]:
        return [[Candidate(p) for p in self.rephrasings(ctx, r)] for r in rows]
