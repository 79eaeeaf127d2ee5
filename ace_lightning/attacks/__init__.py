"""Attacks that try to bring an erased concept back, run by the benchmark as an evaluation (registry kind
``attack``; ``make bench ... ARGS="attacks=soft_prompt,discrete"``).

An attack is called per batch of erased prompt rows of one variant with an :class:`AttackContext` and returns,
for every row, one :class:`Candidate` per restart: a prompt a user could type (``discrete``, ``prompt_search``) or
text-encoder outputs that replace the prompt's (``soft_prompt``, ``textual_inversion``). The bench draws one image
per candidate with the row's own seed and scores it with the suite's scorer; ``bench/attacks.py`` turns the
scores into attack success rates. Attacks are deterministic: every random draw is seeded by the attack seed and
the row, never by the batch or the rank.

| name | access | what it optimises |
|---|---|---|
| ``soft_prompt`` | white box: the attacked model and the base model | k token embeddings in the prompt, so that the attacked model's noise prediction on the base model's latents of the prompt matches the base model's (AdvUnlearn's attack) |
| ``discrete`` | white box: the attacked model, the base model's images | k vocabulary words before the prompt, on the simplex (straight-through), minimising the attacked model's diffusion loss on the base model's images (UnlearnDiffAtk's idea); the result is a typed prompt |
| ``textual_inversion`` | the attacked model and images of the concept | k new token embeddings learned from images of the concept through the attacked model, put in place of the concept's name (Pham et al. 2023) |
| ``prompt_search`` | black box: prompts in, images out | prompts from the concept's synonyms, misspellings and described looks |
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Candidate:
    """One attacked prompt: ``prompt`` is what a user would type (or a readable stand-in when ``embeds`` is set);
    ``embeds`` (T, d): text-encoder outputs used instead of encoding ``prompt``."""

    prompt: str
    embeds: torch.Tensor | None = None


@dataclass
class AttackContext:
    """What an attack may use. ``pipe``: the attacked model (a diffusers pipeline with the variant's edit applied);
    ``base()``: a context in which ``pipe`` is the base model (edit removed, put back on exit); ``phrases``:
    class -> its name and synonyms; ``descriptions``: class -> its look in words (may be empty); ``sampler``:
    the suite's sampler settings; ``seed``: the attack seed; ``variant``: the attacked variant's name."""

    pipe: Any
    base: Callable[[], contextlib.AbstractContextManager]
    phrases: dict[str, list[str]] = field(default_factory=dict)
    descriptions: dict[str, list[str]] = field(default_factory=dict)
    sampler: dict = field(default_factory=dict)
    seed: int = 0
    variant: str = ""  # the attacked variant's name (attacks that learn once per model cache by it)

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def text_encoder(self):
        """The text encoder as the package sees it (SDXL: both encoders as one, see ``models.conditioning``)."""
        from ace_lightning.models.loading import text_encoder_of

        return text_encoder_of(self.pipe)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def noise_scheduler(self):
        from ace_lightning.models.sampling import training_noise_scheduler

        return training_noise_scheduler(self.pipe.scheduler)

    def base_latents(self, rows) -> torch.Tensor:
        """(B, c, h, w): the base model's own latents for each row's prompt and seed (the concept, drawn)."""
        from ace_lightning.models.sampling import generate

        with self.base(), torch.no_grad():
            return generate(self.pipe, [r.prompt for r in rows], [r.seed for r in rows],
                            steps=int(self.sampler.get("steps", 25)), guidance=float(self.sampler.get("guidance", 7.5)),
                            eta=float(self.sampler.get("eta", 0.0)), output_type="latent", batch_size=len(rows),
                            progress=False).to(self.unet.device)


def row_generator(seed: int, *parts) -> torch.Generator:
    """A CPU generator seeded by the attack seed and a row's identity (index, seed, restart, ...): the same draws
    whichever batch or rank the row lands in."""
    key = zlib.crc32(repr((seed, *parts)).encode())
    return torch.Generator().manual_seed(key)


def noisy_latents(ctx: AttackContext, rows, x0: torch.Tensor, steps: int, restart: int, tag: str):
    """Per step: (x_t (B, c, h, w), t (B,), noise) for each row, drawn from that row's own generator."""
    sch = ctx.noise_scheduler
    T = sch.config.num_train_timesteps
    ts, noises = [], []
    for r in rows:
        g = row_generator(ctx.seed, tag, r.index, r.seed, restart)
        ts.append(torch.randint(0, T, (steps,), generator=g))  # (steps,)
        noises.append(torch.randn((steps, *x0.shape[1:]), generator=g))  # (steps, c, h, w)
    t = torch.stack(ts, 1).to(x0.device)  # (steps, B)
    noise = torch.stack(noises, 1).to(x0)  # (steps, B, c, h, w)
    return [(sch.add_noise(x0, noise[s], t[s]), t[s], noise[s]) for s in range(steps)]


def concept_spans(tokenizer, ids: torch.Tensor, rows, phrases: dict[str, list[str]]) -> torch.Tensor:
    """(B, 2) token span [start, end) of each row's concept phrase (its class name or a synonym, the first found);
    rows without one get the first word after BOS."""
    from ace_lightning.method.text import find_span, phrase_ids

    spans = []
    for i, r in enumerate(rows):
        row = ids[i].tolist()
        span = (1, 2)
        for ph in phrases.get(r.label, [r.label]):
            try:
                span = find_span(row, phrase_ids(tokenizer, ph))
                break
            except ValueError:
                continue
        spans.append(span)
    return torch.tensor(spans, dtype=torch.long)
