"""Soft-prompt attack (spec §6): continuous token embeddings that make the *erased* model reproduce
the concept. The optimiser is shared by the training-side inner attack (adversarial augmentation, registry kind
``inner_attack``) and the evaluation attacks in ``ace_lightning/attacks/`` (kind ``attack``)."""

from __future__ import annotations

import torch

from ace_lightning.method.text import encode_ids, eos_position, find_span, soft_tokens
from ace_lightning.models.conditioning import unet_eps
from ace_lightning.registry import lookup, register


# Where the attack's slots go (registry kind ``placeholder_position``): each entry maps one row's token ids, its
# concept span [start, end) and the EOS id to (start, cut): the slots go at ``start``, the row resumes at ``cut``.
@register("placeholder_position", "prefix")
def _prefix(row: list[int], span: tuple[int, int], eos_id: int) -> tuple[int, int]:
    return 1, 1  # right after BOS, nothing dropped


@register("placeholder_position", "suffix")
def _suffix(row: list[int], span: tuple[int, int], eos_id: int) -> tuple[int, int]:
    end = eos_position(row, eos_id)
    return end, end  # before the row's EOS


@register("placeholder_position", "replace")
def _replace(row: list[int], span: tuple[int, int], eos_id: int) -> tuple[int, int]:
    return span  # over the concept phrase, which is dropped


def insert_placeholders(ids: torch.Tensor, span: torch.Tensor, n_adv: int, position: str, eos_id: int):
    """Ids (B, T) with ``n_adv`` placeholder slots per row, and the slots' positions (B, n_adv).

    ``position`` names a ``placeholder_position``: ``prefix`` (right after BOS), ``suffix`` (before each row's
    EOS) or ``replace`` (over each row's concept phrase ``span[i] = [start, end)``; rows may differ in length and
    phrase position). Placeholders carry the row's own BOS id, never EOS: an EOS would end the prompt for whatever
    reads the ids (CLIP's pooled output, SDXL's second tokenizer padding after the first EOS); their embeddings are
    replaced by :func:`soft_tokens` anyway. Rows keep length T (the tail is cut or EOS-padded).
    """
    where = lookup("placeholder_position", position)
    B, T = ids.shape
    if not 0 < n_adv < T - 1:
        raise ValueError(f"adv.n_adv must be in [1, {T - 2}] for {T}-token prompts, got {n_adv}")
    out = torch.full_like(ids, eos_id)
    pos = torch.empty(B, n_adv, dtype=torch.long)
    for i in range(B):
        row = ids[i].tolist()
        start, cut = where(row, (int(span[i, 0]), int(span[i, 1])), eos_id)
        start = min(start, T - 1 - n_adv)  # the slots and an EOS always fit
        new = (row[:start] + [row[0]] * n_adv + row[cut:])[:T]  # row[0]: BOS
        out[i, : len(new)] = torch.tensor(new, dtype=ids.dtype)
        pos[i] = torch.arange(start, start + n_adv)
    return out, pos


def adversarial_gate_tokens(c_adv: torch.Tensor, ids_adv: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor,
                            span: torch.Tensor) -> torch.Tensor:
    """The tokens of attacked rows that a gate must open on (B, n_adv + 1, d): the encoder outputs ``c_adv``
    (B, T, d) at the attack's slots ``positions`` (B, n_adv), plus the concept phrase's last token where the
    phrase is still in the attacked row (``prefix``/``suffix``: a causal encoder re-writes it after the slots;
    ``replace`` drops it, and the last slot stands in). ``ids_adv``: the attacked rows' ids (B, T); ``ids``/``span``:
    the rows before the attack and their phrase spans (B, 2)."""
    B, n_adv = positions.shape
    extra = positions[:, -1].clone()  # (B,)
    for i in range(B):
        phrase = ids[i, int(span[i, 0]) : int(span[i, 1])].tolist()
        try:
            _, end = find_span(ids_adv[i].tolist(), phrase)
            extra[i] = end - 1
        except ValueError:
            pass
    where = torch.cat([positions, extra[:, None]], 1).to(c_adv.device)  # (B, n_adv + 1)
    return c_adv.gather(1, where[..., None].expand(-1, -1, c_adv.shape[-1]))  # (B, n_adv + 1, d)


def phrase_init(text_encoder, ids: torch.Tensor, span: torch.Tensor, n_adv: int) -> torch.Tensor:
    """Start embeddings (B, n_adv, d): each row's own phrase tokens, cycled to ``n_adv`` (the attack starts
    from the concept itself, which the erased model maps to the neutral)."""
    table = text_encoder.get_input_embeddings().weight
    rows = []
    for i in range(ids.shape[0]):
        toks = ids[i, int(span[i, 0]) : int(span[i, 1])]
        rows.append(table[toks[torch.arange(n_adv) % len(toks)]])  # (n_adv, d)
    return torch.stack(rows).detach()


def optimise_soft_tokens(unet, text_encoder, ids: torch.Tensor, positions: torch.Tensor, init: torch.Tensor,
                         steps: int, lr: float, sample, return_tokens: bool = False):
    """Adam on token embeddings (B, n_adv, d) at ``positions`` (B, n_adv) of ``ids`` (B, T).

    ``sample(step) -> (x_t (B, c, h, w), t (B,), eps_target (B, c, h, w))`` gives each step's noisy latents and the
    prediction to match: the step minimises each row's ``||ε'(x_t, c_adv) − ε_target||²`` through ``unet`` and
    ``text_encoder`` (whatever edit they carry). Rows are independent (the loss is a sum of per-row means and
    Adam is element-wise); an ``init`` of one row (1, n_adv, d) is one embedding shared by every row (textual
    inversion). Only the embeddings are optimised (``torch.autograd.grad``; model grads untouched).
    Returns (encoder outputs (B, T, d) detached, final mean loss[, optimised embeddings])."""
    adv = init.detach().clone().float().requires_grad_(True)  # (B, n_adv, d)
    opt = torch.optim.Adam([adv], lr=lr)
    loss = torch.tensor(float("nan"))
    for step in range(max(1, steps)):
        x_t, t, eps_target = sample(step)
        with soft_tokens(text_encoder, positions, adv.expand(ids.shape[0], -1, -1)):
            c = encode_ids(text_encoder, ids)  # (B, T, d)
        pred = unet_eps(unet, x_t, t, c)
        per_row = (pred.float() - eps_target.float()).pow(2).flatten(1).mean(1)  # (B,)
        (g,) = torch.autograd.grad(per_row.sum(), [adv])
        adv.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = per_row.detach().mean()
    with torch.no_grad(), soft_tokens(text_encoder, positions, adv.expand(ids.shape[0], -1, -1)):
        c = encode_ids(text_encoder, ids)
    if return_tokens:
        return c.detach().float(), float(loss), adv.detach()
    return c.detach().float(), float(loss)


@register("inner_attack", "soft_prompt")
def soft_prompt_attack(unet, text_encoder, ids, positions, x_t, t, eps_target, steps: int = 10, lr: float = 1e-2,
                       init: torch.Tensor | None = None, init_ids: torch.Tensor | None = None,
                       init_span: torch.Tensor | None = None, return_tokens: bool = False):
    """The training-side attack: :func:`optimise_soft_tokens` at one fixed (x_t, t) per row, matching
    ``eps_target`` (the frozen model's prediction for the concept prompt). Start: ``init`` (B, n_adv, d), else the
    rows' phrase tokens (``init_ids``/``init_span``, see :func:`phrase_init`), else the placeholder embeddings.
    ``return_tokens``: also return the optimised token embeddings, for a defender that re-encodes them."""
    positions = torch.as_tensor(positions, dtype=torch.long)
    B, n_adv = positions.shape
    if init is None:
        if init_ids is not None and init_span is not None:
            init = phrase_init(text_encoder, init_ids.to(ids.device), init_span, n_adv)
        else:
            init = text_encoder.get_input_embeddings().weight[ids.gather(1, positions.to(ids.device))].detach()
    return optimise_soft_tokens(unet, text_encoder, ids, positions, init, steps, lr, lambda _: (x_t, t, eps_target),
                                return_tokens=return_tokens)
