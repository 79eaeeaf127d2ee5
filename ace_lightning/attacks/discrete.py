"""A discrete-token attack in the spirit of UnlearnDiffAtk: k vocabulary words put before the prompt, chosen by
gradient on the simplex through the attacked model's own diffusion loss on the base model's images of the prompt
(the "diffusion classifier" idea). The result is a prompt a user could type."""

from __future__ import annotations

import re
from functools import lru_cache

import torch

from ace_lightning.attacks import AttackContext, Candidate, noisy_latents, row_generator
from ace_lightning.method.attack import insert_placeholders
from ace_lightning.method.text import encode_ids, phrase_ids, soft_tokens, tokenize
from ace_lightning.models.conditioning import unet_eps
from ace_lightning.registry import register

_WORD = re.compile(r"^[a-z]{2,}$")


@lru_cache(maxsize=4)
def _word_tokens(tokenizer) -> tuple[tuple[int, str], ...]:
    """(id, word) of every whole-word token of lower-case letters that decodes to its word and re-encodes to itself,
    so that words joined by spaces tokenise back to exactly the chosen ids."""
    out = []
    for tok, i in tokenizer.get_vocab().items():
        if not tok.endswith("</w>") or not _WORD.match(tok[:-4]):
            continue
        word = tok[:-4]
        if tokenizer(word, add_special_tokens=False).input_ids == [i]:
            out.append((i, word))
    return tuple(sorted(out))


def candidate_words(tokenizer, exclude: list[str], limit: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Candidate ids (V,) and words: the round-tripping whole words, less every token of the ``exclude``
    phrases (the concept's own name and synonyms: typing them is not an attack) and the words that contain
    them; the first ``limit`` ids only when ``limit`` > 0 (BPE ids are roughly by frequency)."""
    banned_ids = {t for ph in exclude for t in phrase_ids(tokenizer, ph)}
    banned_words = [w.lower() for ph in exclude for w in ph.split() if len(w) > 2]
    pairs = [(i, w) for i, w in _word_tokens(tokenizer)
             if i not in banned_ids and not any(b in w for b in banned_words)]
    if limit > 0:
        pairs = pairs[:limit]
    if not pairs:
        raise ValueError("no candidate words left in the tokenizer's vocabulary")
    return torch.tensor([i for i, _ in pairs]), [w for _, w in pairs]


@register("attack", "discrete")
class DiscreteAttack:
    """``n_tokens`` words before the prompt. Each slot holds logits over the candidate words; the forward pass uses
    the arg-max word (one-hot) and the backward pass the softmax (straight-through), Adam at ``lr`` for ``steps``
    steps, one random timestep and noise per step and row; the words chosen after the last step are the attack. ``vocab``:
    candidate words (0 = all). Defaults: UnlearnDiffAtk's budget at SD scale (40 steps, lr 0.01, 5 tokens)."""

    def __init__(self, n_tokens: int = 5, steps: int = 40, lr: float = 0.01, restarts: int = 1, vocab: int = 0,
                 init_scale: float = 1.0) -> None:
        if n_tokens < 1 or steps < 1 or restarts < 1:
            raise ValueError("discrete needs n_tokens, steps and restarts >= 1")
        self.n_tokens, self.steps, self.lr, self.restarts = n_tokens, steps, lr, restarts
        self.vocab, self.init_scale = vocab, init_scale

    def __call__(self, ctx: AttackContext, rows) -> list[list[Candidate]]:
        tok, te, unet = ctx.tokenizer, ctx.text_encoder, ctx.unet
        x0 = ctx.base_latents(rows)  # (B, c, h, w): the concept as the base model draws it for this prompt and seed
        ids = tokenize(tok, [r.prompt for r in rows]).to(unet.device)
        span = torch.ones(len(rows), 2, dtype=torch.long)
        ids_adv, pos = insert_placeholders(ids, span, self.n_tokens, "prefix", tok.eos_token_id)
        ids_adv = ids_adv.to(unet.device)
        table = te.get_input_embeddings().weight.detach()
        out: list[list[Candidate]] = [[] for _ in rows]
        for restart in range(self.restarts):
            # candidates differ per row (each row's own concept words are excluded): one optimisation per label
            for label in dict.fromkeys(r.label for r in rows):
                idx = [i for i, r in enumerate(rows) if r.label == label]
                cand, words = candidate_words(tok, ctx.phrases.get(label, [label]), self.vocab)
                E = table[cand.to(table.device)]  # (V, d)
                sub = [rows[i] for i in idx]
                logits = torch.stack([torch.randn(self.n_tokens, len(cand), generator=row_generator(
                    ctx.seed, "discrete", r.index, r.seed, restart)) for r in sub]).mul(self.init_scale)
                logits = logits.to(E).requires_grad_(True)  # (b, n, V)
                opt = torch.optim.Adam([logits], lr=self.lr)
                steps = noisy_latents(ctx, sub, x0[idx], self.steps, restart, "discrete")
                for s in range(self.steps):
                    x_t, t, noise = steps[s]
                    soft = logits.softmax(-1)  # (b, n, V)
                    hard = torch.nn.functional.one_hot(soft.argmax(-1), len(cand)).to(soft)
                    emb = (hard + soft - soft.detach()) @ E  # (b, n, d): forward = the chosen words
                    with soft_tokens(te, pos[idx], emb):
                        c = encode_ids(te, ids_adv[idx])
                    pred = unet_eps(unet, x_t, t, c).float()
                    per_row = (pred - noise.float()).pow(2).flatten(1).mean(1)  # (b,)
                    (g,) = torch.autograd.grad(per_row.sum(), [logits])
                    logits.grad = g
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                best_ids = logits.detach().argmax(-1).cpu()  # (b, n): the words after the last step
                for j, i in enumerate(idx):
                    prefix = " ".join(words[int(k)] for k in best_ids[j])
                    out[i].append(Candidate(f"{prefix} {rows[i].prompt}"))
        return out
