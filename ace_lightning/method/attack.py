"""Soft-prompt attack (spec §6): continuous token embeddings that make the *erased* model reproduce
the concept. Used as an inner loop for adversarial augmentation and, later, for robustness ASR."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ace_lightning.method.text import encode_ids, soft_tokens
from ace_lightning.registry import register


def insert_placeholders(ids: torch.Tensor, span: torch.Tensor, n_adv: int, position: str, eos_id: int):
    """Ids (B, T) with ``n_adv`` placeholder slots, and the slots' positions (shared by all rows).

    ``prefix``: right after BOS; ``suffix``: before the EOS of the shortest row; ``replace``: over the concept
    phrase of the first row (rows of one call come from one concept). Placeholders are EOS ids; their
    embeddings are replaced by :func:`soft_tokens`. Rows keep length T (the tail is cut or EOS-padded).
    """
    B, T = ids.shape
    slots = torch.full((B, n_adv), eos_id, dtype=ids.dtype)
    if position == "prefix":
        start, cut = 1, 1  # keep BOS, insert, keep the rest
    elif position == "suffix":
        start = cut = min(int((ids == eos_id).int().argmax(1).min()), T - 1 - n_adv)
    elif position == "replace":
        start, cut = int(span[0, 0]), int(span[0, 1])  # drop the phrase tokens
    else:
        raise ValueError(f"adv.position must be prefix, suffix or replace, got {position!r}")
    out = torch.cat([ids[:, :start], slots, ids[:, cut:]], dim=1)[:, :T]  # (B, <=T)
    pad = torch.full((B, T - out.shape[1]), eos_id, dtype=ids.dtype)
    return torch.cat([out, pad], dim=1), list(range(start, min(start + n_adv, T)))


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
