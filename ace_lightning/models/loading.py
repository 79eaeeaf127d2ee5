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


def damaged_weight_files(root: Path) -> list[tuple[Path, str]]:
    """(file, reason) for every ``*.safetensors`` under the model's component folders that cannot be read whole."""
    from safetensors import safe_open

    bad = []
    for f in sorted(Path(root).glob("*/*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    h.get_tensor(k)
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
            bad.append((f, f"{type(e).__name__}: {str(e)[:120]}"))
    return bad


def load_components(path: str | os.PathLike | None = None, dtype: str = "float32", device: str = "cpu") -> Components:
    """Load unet, text_encoder, tokenizer, vae and scheduler (frozen, eval mode) from ``path``."""
    from diffusers import StableDiffusionPipeline

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(DTYPES)}")
    root = resolve_model_dir(path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            root, torch_dtype=DTYPES[dtype], safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, local_files_only=True,
        )
    except (OSError, ValueError, RuntimeError) as e:
        bad = damaged_weight_files(root)
        if bad:
            raise ModelNotFoundError(f"weights file {bad[0][0]} is incomplete or corrupt ({bad[0][1]})") from e
        raise
    pipe.to(device)
    for m in (pipe.unet, pipe.text_encoder, pipe.vae):
        m.requires_grad_(False)
        m.eval()
    return Components(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, pipe.scheduler, str(root))


def model_fingerprint(unet: torch.nn.Module, targets=("to_k", "to_v")) -> str:
    """sha256 (16 hex) of the edited projections' weights, in module order, as float32.

    Exact, so it tells only that the weights are bit-for-bit the same; the same model loaded in float16 or
    bfloat16 has another one. :func:`weight_signature` is what recognises a model across dtypes."""
    from ace_lightning.method.adapter import base_weights

    h = hashlib.sha256()
    for key, W in base_weights(unet, targets).items():
        h.update(key.encode())
        h.update(W.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def content_fingerprint(components: Components) -> str:
    """sha256 (16 hex) of everything that determines the frozen model's outputs: every tensor of the UNet, text
    encoder and VAE (names, dtypes and bytes), the scheduler config and the tokenizer's size. Keys the latent and
    neighbour caches, so any change to any weight invalidates both (a model in another dtype is another key)."""
    import json

    h = hashlib.sha256()
    for part in ("unet", "text_encoder", "vae"):
        for name, t in getattr(components, part).state_dict().items():
            t = t.detach().to("cpu").contiguous()
            h.update(f"{part}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.flatten().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(dict(components.scheduler.config), sort_keys=True, default=str).encode())
    h.update(f"{len(components.tokenizer)}:{components.tokenizer.model_max_length}".encode())
    return h.hexdigest()[:16]


# Unit roundoff of each storage dtype: the relative error one cast to it can make.
ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}


def weight_signature(unet: torch.nn.Module, targets=("to_k", "to_v"), probes: int = 4) -> list[list[float]]:
    """A dtype-independent signature of the edited projections: per layer, ``uᵢᵀ W vⱼ`` for fixed random unit
    probes (``probes`` x ``probes`` numbers) followed by ``‖W‖_F``, computed in float64.

    Casting W to a half dtype with unit roundoff ``u`` changes every number of a layer's block by at most
    ``u ‖W‖_F`` (|uᵀ ΔW v| <= ‖ΔW‖_F), and in practice by far less (rounding errors average out); a different
    model (another checkpoint, a fine-tune, a perturbed layer) moves the block of some layer by more.
    """
    from ace_lightning.method.adapter import base_weights

    out: list[list[float]] = []
    for W in base_weights(unet, targets).values():
        W = W.detach().to("cpu", torch.float64)  # (o, d)
        g = torch.Generator().manual_seed(W.shape[0] * 1_000_003 + W.shape[1])
        U = torch.randn(W.shape[0], probes, generator=g, dtype=torch.float64)
        V = torch.randn(W.shape[1], probes, generator=g, dtype=torch.float64)
        U, V = U / U.norm(dim=0), V / V.norm(dim=0)
        out.append((U.T @ W @ V).flatten().tolist() + [float(W.norm())])
    return out


def signature_matches(a: list[list[float]], b: list[list[float]], roundoff: float) -> bool:
    """True when, in every layer, the two signature blocks differ by no more than ``2 · roundoff · ‖W‖_F``:
    what casting to a dtype with unit ``roundoff`` can explain (see :func:`weight_signature`)."""
    if len(a) != len(b) or not a:
        return False
    for x, y in zip(a, b):
        if len(x) != len(y):
            return False
        x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
        if float((x - y).norm()) > 2.0 * roundoff * float(x[-1]):
            return False
    return True
