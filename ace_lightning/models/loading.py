"""Loading diffusers Stable-Diffusion-layout models (local dir or local HF cache only) and fingerprints."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REQUIRED = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotFoundError(FileNotFoundError):
    """The model directory or hub id is not available offline, or lacks components."""


@dataclass
class Components:
    unet: Any
    text_encoder: Any
    tokenizer: Any
    vae: Any
    scheduler: Any
    source: str  # the resolved local directory

    def pipeline(self):
        """A stock ``StableDiffusionPipeline`` over these very modules (no safety checker)."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=self.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


def resolve_model_dir(path: str | os.PathLike | None) -> Path:
    """A local directory for ``path``: ToyWorld when None, a local dir, or a hub id in the local cache."""
    if path is None or str(path) == "" or str(path).lower() == "toyworld":
        from ace_lightning.toyworld import PIPELINE_DIR

        path = PIPELINE_DIR
        if not Path(path).is_dir():
            raise ModelNotFoundError(f"the embedded ToyWorld model is missing at {path}; build it with `make toyworld`")
    p = Path(path).expanduser()
    if not p.exists():
        if str(path).startswith((".", "/", "~")) or os.sep in str(path) and str(path).count("/") != 1:
            raise ModelNotFoundError(f"model directory {p} does not exist")
        from huggingface_hub import snapshot_download

        try:  # a hub id: only the local cache, never the network
            p = Path(snapshot_download(str(path), local_files_only=True))
        except Exception as e:  # noqa: BLE001 - any failure means "not available offline"
            raise ModelNotFoundError(
                f"model {path!r} is neither a local directory nor in the local Hugging Face cache "
                f"(downloads are disabled here): {type(e).__name__}"
            ) from e
    missing = [c for c in REQUIRED if not (p / c).is_dir()]
    if missing:
        raise ModelNotFoundError(
            f"{p} is not a diffusers Stable Diffusion directory: missing {missing} (needs {list(REQUIRED)})"
        )
    return p


def load_components(path: str | os.PathLike | None = None, dtype: str = "float32", device: str = "cpu") -> Components:
    """Load unet, text_encoder, tokenizer, vae and scheduler (frozen, eval mode) from ``path``."""
    from diffusers import StableDiffusionPipeline

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(DTYPES)}")
    root = resolve_model_dir(path)
    pipe = StableDiffusionPipeline.from_pretrained(
        root, torch_dtype=DTYPES[dtype], safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, local_files_only=True,
    )
    pipe.to(device)
    for m in (pipe.unet, pipe.text_encoder, pipe.vae):
        m.requires_grad_(False)
        m.eval()
    return Components(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, pipe.scheduler, str(root))


def model_fingerprint(unet: torch.nn.Module, targets=("to_k", "to_v")) -> str:
    """sha256 (16 hex) of the edited projections' weights, in module order, as float32."""
    from ace_lightning.method.adapter import base_weights

    h = hashlib.sha256()
    for key, W in base_weights(unet, targets).items():
        h.update(key.encode())
        h.update(W.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
