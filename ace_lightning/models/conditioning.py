"""One conditioning tensor for every model family, and the UNet call that reads it.

SD-1.x/2.x: the conditioning is the text encoder's last hidden state, (B, T, d).

SDXL: the UNet also needs the pooled text embedding (text_encoder_2's projection, p wide) and six "time ids"
(original size, crop corner, target size). So that every cache, batch, attack and loss keeps carrying one tensor,
an SDXL conditioning is **packed**: (B, T + 1, d) where rows 0..T-1 are the two encoders' penultimate hidden
states concatenated (d = d1 + d2, 2048 for SDXL) and row T holds ``[pooled (p) | time ids (6) | zeros]``
(:class:`DualTextEncoder` writes it, :func:`split_conditioning` reads it back). The packed row is removed before
the UNet sees the hidden states, so attention, the adapters and their gates never see it; token positions and
masks (from the ids, T wide) never reach it either.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

N_TIME_IDS = 6  # (orig_h, orig_w, crop_top, crop_left, target_h, target_w), as diffusers' SDXL pipeline builds them


def packs_pooled(unet) -> bool:
    """True for a UNet that takes the pooled text embedding and time ids (SDXL's ``text_time`` addition)."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def pooled_width(unet) -> int:
    """Width p of the pooled text embedding an SDXL UNet expects (its added embedding's input less the time ids)."""
    return unet.add_embedding.linear_1.in_features - N_TIME_IDS * unet.config.addition_time_embed_dim


def split_conditioning(unet, c: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
    """(hidden (B, T, d), added_cond_kwargs or None) for a conditioning ``c`` of ``unet``'s family."""
    if not packs_pooled(unet):
        return c, None
    p = pooled_width(unet)
    extra = c[:, -1]  # (B, d)
    if extra.shape[-1] < p + N_TIME_IDS:
        raise ValueError(f"conditioning of width {extra.shape[-1]} cannot hold the pooled embedding ({p}) and time ids")
    if extra.shape[-1] > p + N_TIME_IDS and bool(extra[:, p + N_TIME_IDS :].ne(0).any()):
        raise ValueError("an SDXL UNet got an unpacked conditioning (its last row is not [pooled | time ids | 0]); "
                         "encode prompts with the model's DualTextEncoder")
    return c[:, :-1], {"text_embeds": extra[:, :p], "time_ids": extra[:, p : p + N_TIME_IDS]}


def pack(hidden: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """The packed SDXL conditioning (B, T + 1, d) of token rows ``hidden`` (B, T, d), ``pooled`` (B, p) and
    ``time_ids`` (6,) or (B, 6): the inverse of :func:`split_conditioning`."""
    B, _, d = hidden.shape
    p = pooled.shape[-1]
    row = torch.zeros(B, 1, d, dtype=hidden.dtype, device=hidden.device)
    row[:, 0, :p] = pooled.to(hidden)
    row[:, 0, p : p + N_TIME_IDS] = time_ids.to(hidden)
    return torch.cat([hidden, row], 1)


def unet_eps(unet, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The UNet's prediction (ε or v, the model's own) for latents x (B, ch, h, w), timesteps t (B,) and
    conditioning c (B, T, d), or (B, T + 1, d) packed for SDXL. Computed in the UNet's dtype."""
    hidden, added = split_conditioning(unet, c)
    dt = unet.dtype
    if added is not None:
        added = {k: v.to(dt) for k, v in added.items()}
        return unet(x.to(dt), t, encoder_hidden_states=hidden.to(dt), added_cond_kwargs=added).sample
    return unet(x.to(dt), t, encoder_hidden_states=hidden.to(dt)).sample


def pipeline_text_kwargs(unet, c: torch.Tensor) -> dict:
    """The keyword arguments that hand a (packed) conditioning to a stock diffusers pipeline of ``unet``'s family.
    The time ids are the pipeline's own at its default size (what :class:`DualTextEncoder` packs)."""
    hidden, added = split_conditioning(unet, c)
    if added is None:
        return {"prompt_embeds": hidden}
    return {"prompt_embeds": hidden, "pooled_prompt_embeds": added["text_embeds"]}


class ConcatEmbedding(nn.Module):
    """The two encoders' token-embedding tables seen as one (V, d1 + d2) table. Soft-token hooks and attacks
    (``get_input_embeddings()``) read ``weight`` and hook ``forward``; :class:`DualTextEncoder` feeds each
    encoder its slice of this module's output."""

    def __init__(self, first: nn.Embedding, second: nn.Embedding):
        super().__init__()
        object.__setattr__(self, "parts", (first, second))  # not submodules: they belong to the encoders

    @property
    def weight(self) -> torch.Tensor:
        a, b = self.parts
        return torch.cat([a.weight, b.weight.to(a.weight.dtype)], 1)  # (V, d1 + d2)

    def forward(self, ids: torch.Tensor, ids_2: torch.Tensor) -> torch.Tensor:
        a, b = self.parts
        return torch.cat([a(ids), b(ids_2).to(a.weight.dtype)], -1)  # (B, T, d1 + d2)


@contextlib.contextmanager
def _output_replaced(module: nn.Module, value: torch.Tensor):
    handle = module.register_forward_hook(lambda _m, _i, _o: value)
    try:
        yield
    finally:
        handle.remove()


class DualTextEncoder(nn.Module):
    """SDXL's two text encoders as the one text encoder the rest of the package expects.

    ``forward(ids)`` takes the first tokenizer's ids (B, T) (both SDXL tokenizers share one vocabulary; only
    the padding after EOS differs, and is redone here with ``pad_id_2``) and returns ``(packed,)`` as described in
    the module docstring: exactly what diffusers' ``StableDiffusionXLPipeline.encode_prompt`` gives (the
    penultimate hidden states, text_encoder_2's pooled projection) plus the default-size time ids."""

    def __init__(self, text_encoder: nn.Module, text_encoder_2: nn.Module, pad_id_2: int, eos_id: int,
                 time_ids: tuple[float, ...]):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.pad_id_2, self.eos_id = int(pad_id_2), int(eos_id)
        if len(time_ids) != N_TIME_IDS:
            raise ValueError(f"time_ids needs {N_TIME_IDS} numbers, got {len(time_ids)}")
        self.register_buffer("time_ids", torch.tensor([float(v) for v in time_ids]), persistent=False)
        self.embed = ConcatEmbedding(text_encoder.get_input_embeddings(), text_encoder_2.get_input_embeddings())
        self.widths = (text_encoder.config.hidden_size, text_encoder_2.config.hidden_size)
        self.pooled_dim = text_encoder_2.config.projection_dim
        if self.pooled_dim + N_TIME_IDS > sum(self.widths):
            raise ValueError(f"pooled width {self.pooled_dim} + {N_TIME_IDS} time ids do not fit a row of "
                             f"{sum(self.widths)}")

    def get_input_embeddings(self) -> ConcatEmbedding:
        return self.embed

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.dtype

    def second_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The second tokenizer's ids for the first one's: everything after the first EOS is ``pad_id_2``."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        is_eos = ids == self.eos_id
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1), ids.shape[1] - 1)  # (B,)
        return torch.where(pos[None] > first[:, None], torch.full_like(ids, self.pad_id_2), ids)

    def forward(self, input_ids: torch.Tensor, **_ignored) -> tuple[torch.Tensor]:
        ids_2 = self.second_ids(input_ids)
        e = self.embed(input_ids, ids_2)  # (B, T, d1 + d2); soft-token hooks act here
        e1, e2 = e.split(self.widths, -1)
        with _output_replaced(self.text_encoder.get_input_embeddings(), e1):
            h1 = self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-2]  # (B, T, d1)
        with _output_replaced(self.text_encoder_2.get_input_embeddings(), e2.to(self.text_encoder_2.dtype)):
            out2 = self.text_encoder_2(ids_2, output_hidden_states=True)
        h2, pooled = out2.hidden_states[-2], out2[0]  # (B, T, d2), (B, p)
        hidden = torch.cat([h1, h2.to(h1.dtype)], -1)  # (B, T, d)
        return (pack(hidden, pooled, self.time_ids),)  # (B, T + 1, d)
