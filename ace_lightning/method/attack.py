"""Soft-prompt attack (spec §6): continuous token embeddings that make the *erased* model reproduce
the concept. Used as an inner loop for adversarial augmentation and, later, for robustness ASR."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ace_lightning.method.text import encode_ids, soft_tokens
from ace_lightning.registry import register


def insert_placeholders(ids: torch.Tensor, span: torch.Tensor, n_adv: int, position: str, eos_id: int):
    """New ids (B, T) with ``n_adv`` slots and their positions (shared by all rows: the slots go at the
    same place). ``prefix``: after BOS; ``suffix``: before EOS of the shortest row; ``replace``: over
    the concept phrase of the first row (rows of one call share the template position)."""
    B, T = ids.shape
    ids = ids.clone()
    if position == "prefix":
        pos = list(range(1, 1 + n_adv))
        ids = torch.cat([ids[:, :1], ids[:, :1].expand(B, n_adv) * 0 + eos_id, ids[:, 1:]], dim=1)[:, :T]
        ids[:, -1] = torch.where(ids[:, -1] == eos_id, ids[:, -1], torch.full_like(ids[:, -1], eos_id))
    elif position == "suffix":
        end = int((ids == eos_id).int().argmax(1).min())  # first EOS of the shortest prompt
        end = min(end, T - 1 - n_adv)
        pos = list(range(end, end + n_adv))
        ids[:, end + n_adv :] = eos_id
    elif position == "replace":
        s, e = int(span[0, 0]), int(span[0, 1])
        pos = list(range(s, min(s + n_adv, T - 1)))
        rest = ids[:, e:]
        ids = torch.cat([ids[:, :s], ids[:, :1].expand(B, len(pos)) * 0 + eos_id, rest], dim=1)[:, :T]
        if ids.shape[1] < T:
            ids = torch.cat([ids, torch.full((B, T - ids.shape[1]), eos_id, dtype=ids.dtype)], dim=1)
    else:
        raise ValueError(f"adv.position must be prefix, suffix or replace, got {position!r}")
    return ids, pos


@register("attack", "soft_prompt")
def soft_prompt_attack(unet, text_encoder, ids, positions, x_t, t, eps_target, steps: int = 10, lr: float = 1e-2,
                       init: torch.Tensor | None = None):
    """Optimise the token embeddings at ``positions`` (n_adv, d) with Adam for ``steps`` steps to minimise
    ``||ε'(x_t, c_adv) − ε_target||²``; returns (adversarial encoder outputs (B, T, d) detached, final loss).
    Only the embeddings are optimised (gradients via ``torch.autograd.grad``, model grads untouched)."""
    table = text_encoder.get_input_embeddings()
    if init is None:
        init = table.weight[ids[0, positions]].detach()
    adv = init.detach().clone().float().requires_grad_(True)  # (n_adv, d)
    opt = torch.optim.Adam([adv], lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(max(1, steps)):
        with soft_tokens(text_encoder, positions, adv[None]):
            c = encode_ids(text_encoder, ids)  # (B, T, d)
        pred = unet(x_t, t, encoder_hidden_states=c.to(unet.dtype)).sample
        loss = F.mse_loss(pred.float(), eps_target.float())
        (g,) = torch.autograd.grad(loss, [adv])
        adv.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad(), soft_tokens(text_encoder, positions, adv[None]):
        c = encode_ids(text_encoder, ids)
    return c.detach().float(), float(loss)
