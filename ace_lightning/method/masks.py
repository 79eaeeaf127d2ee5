"""Where the concept is in an image: mask sources for MACE's attention loss (registry kind ``mask_source``).

A source is built from config (``mace.masks: {name: ..., ...}``) and called on images (N, 3, H, W) in [0, 1]; it
returns masks (N, 1, H, W) in [0, 1]. A deployer with a segmentation model registers their own source under a new
name (``@register("mask_source", "<name>")``); none is downloaded here.
"""

from __future__ import annotations

import torch

from ace_lightning.registry import register
from ace_lightning.utils import say


@register("mask_source", "flat_background")
def flat_background(threshold: float = 0.15, border: int = 2):
    """The concept is whatever differs from the background, read as the median colour of a ``border``-pixel frame
    (clip-art, ToyWorld): pixels whose largest channel difference exceeds ``threshold``."""

    def masks(images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W), got {tuple(images.shape)}")
        frame = torch.cat([images[..., :border, :].flatten(2), images[..., -border:, :].flatten(2),
                           images[..., :, :border].flatten(2), images[..., :, -border:].flatten(2)], dim=2)
        bg = frame.median(dim=2).values[..., None, None]  # (N, 3, 1, 1)
        return ((images - bg).abs().amax(dim=1, keepdim=True) > threshold).float()  # (N, 1, H, W)

    return masks


@register("mask_source", "none")
def whole_image():
    """No segmentation: the whole image is the concept's region (MACE's loss then suppresses the concept tokens'
    attention everywhere). Said loudly, since the paper's masks come from a segmentation model."""

    def masks(images: torch.Tensor) -> torch.Tensor:
        say("MACE: no concept masks given (mace.masks.name=none): the whole image is used as the concept's region; "
            "register a mask_source (a segmentation model) for the paper's masked attention loss")
        return torch.ones_like(images[:, :1])

    return masks
