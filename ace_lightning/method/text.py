"""Text-side helpers: tokenising, encoding (also from soft token embeddings) and token positions.

The closed form and the gate work on rows of the text encoder's last hidden state (what the UNet's
``attn2.to_k`` / ``to_v`` see). Token length always comes from the tokenizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ace_lightning.registry import ConfigError, register


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's model length -> (B, T) long."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def phrase_ids(tokenizer, phrase: str) -> list[int]:
    """Token ids of a phrase on its own (no BOS/EOS)."""
    return tokenizer(phrase, add_special_tokens=False).input_ids


def find_span(ids: Sequence[int], sub: Sequence[int]) -> tuple[int, int]:
    """``(start, end)`` of the last occurrence of ``sub`` in ``ids``; ValueError if absent."""
    ids, sub = list(ids), list(sub)
    for s in range(len(ids) - len(sub), -1, -1):
        if ids[s : s + len(sub)] == sub:
            return s, s + len(sub)
    raise ValueError("phrase not found in prompt tokens (truncated, or tokenised differently in context)")


def eos_position(ids: Sequence[int], eos_id: int) -> int:
    """Index of the first EOS token (SD-1 pads with EOS too, so the first one is the real end)."""
    ids = list(ids)
    return ids.index(eos_id, 1) if eos_id in ids[1:] else len(ids) - 1


# Token policies pair positions of a concept prompt with the corresponding positions of its neutral
# prompt: (span_c, eos_c, span_n, eos_n) -> (positions_c, positions_n).
@register("token_policy", "last")
def policy_last(span_c, eos_c, span_n, eos_n):
    return [span_c[1] - 1], [span_n[1] - 1]


@register("token_policy", "last+eos")
def policy_last_eos(span_c, eos_c, span_n, eos_n):
    return [span_c[1] - 1, eos_c], [span_n[1] - 1, eos_n]


def _phrase_pairs(span_c, span_n):
    n_len = span_n[1] - span_n[0]
    pc = list(range(*span_c))
    pn = [span_n[0] + min(i, n_len - 1) for i in range(len(pc))]  # extra concept tokens map to the last neutral one
    return pc, pn


@register("token_policy", "phrase")
def policy_phrase(span_c, eos_c, span_n, eos_n):
    return _phrase_pairs(span_c, span_n)


@register("token_policy", "all_after")
def policy_all_after(span_c, eos_c, span_n, eos_n):
    pc, pn = _phrase_pairs(span_c, span_n)
    after = range(span_c[1], eos_c + 1)  # the rest of the prompt through EOS, shifted by the length change
    shift = span_n[1] - span_c[1]
    pc += list(after)
    pn += [j + shift for j in after]
    return pc, pn


def paired_positions(tokenizer, prompt: str, phrase: str, neutral_prompt: str, neutral: str, policy: str):
    """Positions of the target tokens in ``prompt`` and the matching ones in ``neutral_prompt``."""
    return paired_positions_many(tokenizer, [(prompt, phrase, neutral_prompt)], neutral, policy)[0]


def paired_positions_many(tokenizer, triples: Sequence[tuple[str, str, str]], neutral: str,
                          policy: str) -> list[tuple[list[int], list[int]]]:
    """:func:`paired_positions` of every (prompt, phrase, neutral prompt) triple sharing one ``neutral`` phrase:
    the prompts tokenised in two batched calls and each phrase once (one call per prompt: 20.6 s of a
    100-concept run's data stage under cProfile, docs/SCALE.md seventh round). -> [(positions_c, positions_n)] in order."""
    from ace_lightning.registry import lookup

    fn = lookup("token_policy", policy)
    if not triples:
        return []
    ids_c = tokenize(tokenizer, [p for p, _, _ in triples]).tolist()  # (B, T)
    ids_n = tokenize(tokenizer, [n for _, _, n in triples]).tolist()  # (B, T)
    eos, pieces = tokenizer.eos_token_id, {}
    neu = phrase_ids(tokenizer, neutral)
    out = []
    for (prompt, phrase, neutral_prompt), c, n in zip(triples, ids_c, ids_n):
        if phrase not in pieces:
            pieces[phrase] = phrase_ids(tokenizer, phrase)
        try:
            span_c, span_n = find_span(c, pieces[phrase]), find_span(n, neu)
        except ValueError as e:
            raise ConfigError(f"{e}: prompt {prompt!r} / phrase {phrase!r}, neutral {neutral_prompt!r} / "
                              f"{neutral!r}") from e
        out.append(fn(span_c, eos_position(c, eos), span_n, eos_position(n, eos)))
    return out


def token_mask(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Non-pad tokens (BOS through first EOS) of ids (B, T) -> bool (B, T)."""
    pos = torch.arange(ids.shape[1])
    ends = torch.tensor([eos_position(r, eos_id) for r in ids.tolist()])
    return pos[None, :] <= ends[:, None]


@contextlib.contextmanager
def soft_tokens(text_encoder: nn.Module, positions, embeds: torch.Tensor) -> Iterator[None]:
    """Within the block, token embeddings at ``positions`` are replaced by ``embeds`` (B|1, n, d).

    ``positions``: n indices shared by every row, or a (B, n) tensor of per-row indices.
    A forward hook on the input embedding table, so the encoder's own forward (masks, position
    embeddings, final norm) is used unchanged; gradients flow to ``embeds``.
    """
    table = text_encoder.get_input_embeddings()
    pos = torch.as_tensor(positions, dtype=torch.long)

    def hook(_mod, _inp, out):  # out (B, T, d)
        out = out.clone()
        B = out.shape[0]
        p = (pos if pos.dim() == 2 else pos[None].expand(B, -1)).to(out.device)  # (B, n)
        rows = torch.arange(B, device=out.device)[:, None]  # (B, 1)
        out[rows, p] = embeds.to(out.dtype).expand(B, -1, -1)
        return out

    handle = table.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_ids(text_encoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Last hidden state (B, T, d) for ids (B, T)."""
    dev = next(text_encoder.parameters()).device
    return text_encoder(ids.to(dev))[0]


@torch.no_grad()
def encode_prompts(text_encoder: nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = 64):
    """Float32 hidden states (B, T, d) and ids (B, T) of ``prompts``."""
    hs, all_ids = [], []
    for i in range(0, len(prompts), batch_size):
        ids = tokenize(tokenizer, prompts[i : i + batch_size])
        hs.append(encode_ids(text_encoder, ids).float().cpu())
        all_ids.append(ids)
    return torch.cat(hs), torch.cat(all_ids)


@torch.no_grad()
def last_word_states(text_encoder: nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Float32 hidden states (B, d) at each prompt's last word token (the token before its EOS)."""
    h, ids = encode_prompts(text_encoder, tokenizer, prompts, batch_size=batch_size)  # (B, T, d)
    pos = [eos_position(r, tokenizer.eos_token_id) - 1 for r in ids.tolist()]
    return h[torch.arange(len(prompts)), pos]
