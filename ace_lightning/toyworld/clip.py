"""The toy open_clip model trained on ToyWorld pairs (for CLIP-score style metrics)."""
from __future__ import annotations

from pathlib import Path

import torch

from .components import CLIP_MODEL_NAME, register_toy_clip

WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = f"{CLIP_MODEL_NAME}.json"  # open_clip names a registered config by its file stem


def load_toy_clip(device: str = "cpu", path: str | Path | None = None):
    """(model, preprocess, tokenizer) of the shipped toy CLIP; model in eval mode, float32."""
    import open_clip

    from . import CLIP_DIR, require_files

    path = Path(path) if path is not None else CLIP_DIR
    require_files(path, (CONFIG_FILE, WEIGHTS_FILE), "ToyWorld CLIP")
    name = register_toy_clip(path / CONFIG_FILE)
    # open_clip loads the file itself (strictly), so it does not warn "no pretrained weights loaded"
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path / WEIGHTS_FILE), device="cpu")
    model.float()
    return model.to(device).eval(), preprocess, open_clip.get_tokenizer(name)


def normalize(images: torch.Tensor, model) -> torch.Tensor:
    """(B, 3, 32, 32) in [0, 1] -> the model's normalised input (what `preprocess` does to a PIL image)."""
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"], device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std
