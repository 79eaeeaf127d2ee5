"""Tiny random-weight stand-ins for the bench machinery's own tests (never downloads anything).

`tiny_open_clip` writes an open_clip model config + checkpoint usable as
``scorer: {name: clip_zero_shot, model: <name>, model_config: <json>, pretrained: <file>}``.
Its numbers mean nothing; it exercises scoring, sharding, resuming and metric reduction.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CLIP_NAME = "bench-tiny-clip"


def tiny_open_clip(path: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """(config json, checkpoint) of a tiny random open_clip model named TINY_CLIP_NAME."""
    import open_clip

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg_path, ckpt = path / f"{TINY_CLIP_NAME}.json", path / "tiny_clip.pt"
    if not ckpt.is_file():
        cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 4, "head_width": 16},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
        cfg_path.write_text(json.dumps(cfg))
        if TINY_CLIP_NAME not in open_clip.list_models():
            open_clip.add_model_config(str(cfg_path))
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
        torch.save(model.state_dict(), ckpt)
    return cfg_path, ckpt
