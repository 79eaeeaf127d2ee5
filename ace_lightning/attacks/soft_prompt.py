"""The soft-prompt attack as an evaluation (AdvUnlearn's attack): continuous token embeddings in the prompt that
make the attacked model's noise prediction on the base model's latents of the prompt match the base model's."""

from __future__ import annotations

import torch

from ace_lightning.attacks import AttackContext, Candidate, concept_spans, noisy_latents, row_generator
from ace_lightning.method.attack import insert_placeholders, optimise_soft_tokens, phrase_init
from ace_lightning.method.text import encode_ids, tokenize
from ace_lightning.models.conditioning import unet_eps
from ace_lightning.registry import lookup, register


@register("attack", "soft_prompt")
class SoftPromptAttack:
    """``n_tokens`` embeddings at ``position`` (a ``placeholder_position``: prefix, suffix, replace), Adam for
    ``steps`` steps at ``lr``, one random timestep and noise per step and row; ``restarts`` starts (the first
    from the row's own concept tokens, the others from those plus Gaussian noise of ``init_noise`` times the
    embedding table's std). Defaults for SD scale: 5 prefix tokens, 30 steps, the budget order of AdvUnlearn's and
    UnlearnDiffAtk's attacks; the ToyWorld suites set their own in their ``attacks`` section."""

    def __init__(self, n_tokens: int = 5, steps: int = 30, lr: float = 1e-2, restarts: int = 1,
                 position: str = "prefix", init_noise: float = 0.5) -> None:
        lookup("placeholder_position", position)  # a typo fails here
        if n_tokens < 1 or steps < 1 or restarts < 1:
            raise ValueError("soft_prompt needs n_tokens, steps and restarts >= 1")
        self.n_tokens, self.steps, self.lr, self.restarts = n_tokens, steps, lr, restarts
        self.position, self.init_noise = position, init_noise

    def __call__(self, ctx: AttackContext, rows) -> list[list[Candidate]]:
        tok, te, unet = ctx.tokenizer, ctx.text_encoder, ctx.unet
        ids = tokenize(tok, [r.prompt for r in rows]).to(unet.device)  # (B, T)
        span = concept_spans(tok, ids, rows, ctx.phrases)  # (B, 2)
        x0 = ctx.base_latents(rows)  # (B, c, h, w)
        ids_adv, pos = insert_placeholders(ids, span, self.n_tokens, self.position, tok.eos_token_id)
        ids_adv = ids_adv.to(unet.device)
        table_std = float(te.get_input_embeddings().weight.std())
        out: list[list[Candidate]] = [[] for _ in rows]
        for restart in range(self.restarts):
            steps = noisy_latents(ctx, rows, x0, self.steps, restart, "soft_prompt")
            with ctx.base(), torch.no_grad():  # the base model's predictions for the plain prompt: the target
                c_base = encode_ids(te, ids)
                targets = [unet_eps(unet, x_t, t, c_base).float() for x_t, t, _ in steps]
            init = phrase_init(te, ids, span, self.n_tokens)  # (B, n, d)
            if restart:
                noise = torch.stack([torch.randn(init.shape[1:], generator=row_generator(ctx.seed, "sp-init", r.index,
                                                                                         r.seed, restart))
                                     for r in rows]).to(init)
                init = init + self.init_noise * table_std * noise
            c_adv, _ = optimise_soft_tokens(unet, te, ids_adv, pos, init, self.steps, self.lr,
                                            lambda s, st=steps, tg=targets: (st[s][0], st[s][1], tg[s]))
            for i, r in enumerate(rows):
                out[i].append(Candidate(f"[{self.n_tokens} soft tokens, {self.position}] {r.prompt}", c_adv[i]))
        return out
