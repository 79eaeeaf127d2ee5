"""Cross-attention maps for MACE's attention loss: a processor that records ``softmax(q kᵀ / √d)`` of every
``attn2`` it is installed on, and the loss that pushes a concept's tokens' attention out of the concept's region.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class RecordingAttnProcessor:
    """Plain scaled-dot-product cross-attention that also appends its attention probabilities (B·heads, HW, T)
    to ``maps``. For the UNet's ``attn2`` layers (no norms, no residual inside the attention module)."""

    def __init__(self, maps: list[torch.Tensor]):
        self.maps = maps

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attn.norm_cross is not None or attn.residual_connection or attn.group_norm is not None or \
                getattr(attn, "spatial_norm", None) is not None or attn.rescale_output_factor != 1.0:
            raise NotImplementedError("attention-map recording supports plain cross-attention layers only")
        if hidden_states.dim() != 3:
            raise NotImplementedError(f"expected (B, HW, C) hidden states, got {tuple(hidden_states.shape)}")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B·h, HW, dh)
        k = attn.head_to_batch_dim(attn.to_k(context))  # (B·h, T, dh)
        v = attn.head_to_batch_dim(attn.to_v(context))  # (B·h, T, dh)
        probs = attn.get_attention_scores(q, k, attention_mask)  # (B·h, HW, T)
        self.maps.append(probs)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))  # (B, HW, C)
        return attn.to_out[1](attn.to_out[0](out))


def record_cross_attention(unet: torch.nn.Module) -> list[torch.Tensor]:
    """Install :class:`RecordingAttnProcessor` on every ``attn2`` of ``unet`` (a copy being trained: it changes
    the module for good); returns the list the maps are appended to (clear it before each forward)."""
    maps: list[torch.Tensor] = []
    found = 0
    for name, mod in unet.named_modules():
        if name.endswith("attn2") and hasattr(mod, "set_processor"):
            mod.set_processor(RecordingAttnProcessor(maps))
            found += 1
    if not found:
        raise ValueError("no cross-attention (attn2) layers found in the UNet")
    return maps


def masked_attention_loss(maps: list[torch.Tensor], tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MACE's attention loss: Σ_layers mean_heads Σ_{concept tokens} ||A_token ⊙ M||², averaged over rows.

    maps: per layer (B·heads, HW, T); tokens (B, T) bool, the concept's tokens in each row's prompt; mask
    (B, 1, H, W) in [0, 1], the concept's region in the row's image (resized to each layer's H' x W')."""
    B, T = tokens.shape
    H, W = mask.shape[-2:]
    total = mask.new_zeros(())
    for A in maps:
        heads, HW = A.shape[0] // B, A.shape[1]
        h = round(math.sqrt(HW * H / W))
        w = HW // h
        if h * w != HW:
            raise ValueError(f"an attention map of {HW} positions does not fit the mask's aspect {H}x{W}")
        m = F.interpolate(mask.to(A.dtype), size=(h, w), mode="area").flatten(1)  # (B, HW)
        A = A.reshape(B, heads, HW, T)  # head_to_batch_dim is batch-major
        sel = A * tokens[:, None, None, :].to(A.dtype) * m[:, None, :, None]  # (B, heads, HW, T)
        total = total + sel.pow(2).sum(dim=(2, 3)).mean(dim=1).mean()
    return total
