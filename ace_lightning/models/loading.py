"""Loading diffusers Stable-Diffusion-layout models (local dir or local HF cache only) and fingerprints."""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ace_lightning.models.conditioning import N_TIME_IDS
from ace_lightning.registry import lookup, names, register

REQUIRED = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotFoundError(FileNotFoundError):
    """The model directory or hub id is not available offline, or lacks components."""


@dataclass
class Components:
    """A loaded model. ``text_encoder`` is the one text encoder the package works with: the model's own (SD-1.x/2.x)
    or a :class:`~ace_lightning.models.conditioning.DualTextEncoder` over both (SDXL). ``family``: the registered
    ``model_family`` (the diffusers pipeline class) that rebuilds a stock pipeline over these very modules;
    ``extra``: that family's other parts (SDXL: the second tokenizer and ``force_zeros_for_empty_prompt``)."""

    unet: Any
    text_encoder: Any
    tokenizer: Any
    vae: Any
    scheduler: Any
    source: str  # the resolved local directory
    family: str = "StableDiffusionPipeline"
    extra: dict = field(default_factory=dict)

    def pipeline(self):
        """A stock diffusers pipeline of the model's family over these very modules (no safety checker)."""
        pipe = lookup("model_family", self.family).pipeline(self)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def unconditional(self):
        """The conditioning (1, T[+1], d) the model's classifier-free guidance uses for "no prompt"."""
        return lookup("model_family", self.family).unconditional(self)


@register("model_family", "StableDiffusionPipeline")
class StableDiffusionFamily:
    """SD-1.x / 2.x: one CLIP text encoder, whose last hidden state is the conditioning."""

    LOAD_KWARGS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    @staticmethod
    def components(pipe, root: str) -> Components:
        return Components(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, pipe.scheduler, root,
                          "StableDiffusionPipeline")

    @staticmethod
    def pipeline(c: Components):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=c.scheduler,
            **StableDiffusionFamily.LOAD_KWARGS,
        )

    @staticmethod
    def unconditional(c: Components):
        """(1, T, d): the empty prompt's encoding (what classifier-free guidance uses)."""
        from ace_lightning.method.text import encode_prompts

        return encode_prompts(c.text_encoder, c.tokenizer, [""])[0]


@register("model_family", "StableDiffusionXLPipeline")
class StableDiffusionXLFamily:
    """SDXL: two text encoders (penultimate hidden states concatenated), the pooled embedding and the time ids,
    packed into one conditioning by :class:`~ace_lightning.models.conditioning.DualTextEncoder`."""

    LOAD_KWARGS = {"add_watermarker": False}

    @staticmethod
    def components(pipe, root: str) -> Components:
        extra = {"tokenizer_2": pipe.tokenizer_2,
                 "force_zeros_for_empty_prompt": bool(pipe.config.force_zeros_for_empty_prompt)}
        return Components(pipe.unet, text_encoder_of(pipe), pipe.tokenizer, pipe.vae, pipe.scheduler, root,
                          "StableDiffusionXLPipeline", extra)

    @staticmethod
    def pipeline(c: Components):
        """The stock pipeline over ``c.text_encoder``'s own two encoders (a trained copy of the pair included)."""
        from diffusers import StableDiffusionXLPipeline

        dual = c.text_encoder
        pipe = StableDiffusionXLPipeline(
            vae=c.vae, text_encoder=dual.text_encoder, text_encoder_2=dual.text_encoder_2, tokenizer=c.tokenizer,
            tokenizer_2=c.extra["tokenizer_2"], unet=c.unet, scheduler=c.scheduler,
            force_zeros_for_empty_prompt=c.extra["force_zeros_for_empty_prompt"], **StableDiffusionXLFamily.LOAD_KWARGS,
        )
        pipe._ace_text_stack = dual
        return pipe

    @staticmethod
    def unconditional(c: Components):
        """(1, T + 1, d): what the pipeline's guidance uses for "no prompt": zero token rows and a zero pooled
        embedding when ``force_zeros_for_empty_prompt`` (SDXL base), else the empty prompt's encoding."""
        from ace_lightning.method.text import encode_prompts

        emb = encode_prompts(c.text_encoder, c.tokenizer, [""])[0]  # (1, T + 1, d)
        if c.extra["force_zeros_for_empty_prompt"]:
            p = c.text_encoder.pooled_dim
            keep = emb[:, -1:, p : p + N_TIME_IDS].clone()  # the time ids stay
            emb.zero_()
            emb[:, -1:, p : p + N_TIME_IDS] = keep
        return emb


def text_encoder_of(pipe):
    """The text encoder as the package sees it, for a stock pipeline (any task: text-to-image, img2img, ...): the
    pipeline's own, or for a pipeline with a second text encoder (SDXL) a
    :class:`~ace_lightning.models.conditioning.DualTextEncoder` over both, made once per pipeline (time ids at its
    default size)."""
    from ace_lightning.models.conditioning import DualTextEncoder

    if getattr(pipe, "text_encoder_2", None) is None:
        return pipe.text_encoder
    stack = getattr(pipe, "_ace_text_stack", None)
    if stack is None or stack.text_encoder is not pipe.text_encoder or stack.text_encoder_2 is not pipe.text_encoder_2:
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        stack = pipe._ace_text_stack = DualTextEncoder(
            pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer_2.pad_token_id, pipe.tokenizer.eos_token_id,
            (size, size, 0, 0, size, size))
    return stack


def model_family(root: Path) -> str:
    """The registered family of a diffusers model directory, from its ``model_index.json``."""
    import json

    index = root / "model_index.json"
    cls = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else "StableDiffusionPipeline"
    if cls not in names("model_family"):
        raise ModelNotFoundError(f"{root} holds a {cls or 'model of unknown class'}; supported families: "
                                 f"{', '.join(names('model_family'))}")
    return cls


def resolve_model_dir(path: str | os.PathLike | None) -> Path:
    """A local directory for ``path``: ToyWorld when None, a registered ``model_alias`` (``toyworld-cast``), a
    local dir, or a hub id in the local cache."""
    if path is not None and str(path) in names("model_alias"):
        path = lookup("model_alias", str(path))()
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
    """Load a model's parts (frozen, eval mode) from ``path``: SD-1.x/2.x or SDXL (see :class:`Components`)."""
    import diffusers

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(DTYPES)}")
    root = resolve_model_dir(path)
    family = model_family(root)
    try:
        pipe = getattr(diffusers, family).from_pretrained(
            root, torch_dtype=DTYPES[dtype], local_files_only=True, **lookup("model_family", family).LOAD_KWARGS)
    except (OSError, ValueError, RuntimeError) as e:
        bad = damaged_weight_files(root)
        if bad:
            raise ModelNotFoundError(f"weights file {bad[0][0]} is incomplete or corrupt ({bad[0][1]})") from e
        raise
    pipe.to(device)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False)
            m.eval()
    return lookup("model_family", family).components(pipe, str(root))


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


# Keys of saved configs that record where and with which library versions a folder was written, not what it holds.
PROVENANCE_KEYS = frozenset({"_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash"})


def weights_digest(root: str | os.PathLike) -> str:
    """sha256 (16 hex) of what a diffusers folder holds, not of where or how it was written: every safetensors
    tensor (component folder, name, dtype, shape, bytes; in name order, so the file split and header order do not
    count), every JSON file without its :data:`PROVENANCE_KEYS`, and every other file's bytes. Only
    ``model_index.json`` and the component folders it names are read (without one: :data:`REQUIRED`), hidden files
    skipped. The same weights saved again elsewhere give the same digest; any changed tensor gives another. Read
    from disk without building the model (SD-1.4 size: a few seconds)."""
    import json

    from safetensors import safe_open

    root = Path(root)
    index = root / "model_index.json"
    parts = ([k for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and v and v[0]]
             if index.is_file() else list(REQUIRED))
    files = sorted(({index} if index.is_file() else set()) | {
        f for part in parts if (root / part).is_dir() for f in (root / part).rglob("*")
        if f.is_file() and not any(x.startswith(".") for x in f.relative_to(root).parts)})
    h = hashlib.sha256()
    tensors = []  # (component folder, tensor name, file)
    for f in files:
        rel = f.relative_to(root)
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as st:
                tensors += [(rel.parent.as_posix(), k, f) for k in st.keys()]
        elif f.suffix == ".json":
            cfg = json.loads(f.read_text())
            if isinstance(cfg, dict):
                cfg = {k: v for k, v in cfg.items() if k not in PROVENANCE_KEYS}
            h.update(f"{rel.as_posix()}:{json.dumps(cfg, sort_keys=True)}".encode())
        else:
            h.update(f"{rel.as_posix()}:".encode() + f.read_bytes())
    with contextlib.ExitStack() as stack:
        opened = {}
        for folder, name, f in sorted(tensors, key=lambda t: t[:2]):
            if f not in opened:
                opened[f] = stack.enter_context(safe_open(str(f), framework="pt"))
            t = opened[f].get_tensor(name).contiguous()
            h.update(f"{folder}/{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.flatten().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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
