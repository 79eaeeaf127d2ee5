"""Adapter files (safetensors, no pickle) and applying them to stock diffusers pipelines (spec §7)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ace_lightning import __version__
from ace_lightning.method.adapter import AdapterBank, bank_of, inject, remove
from ace_lightning.models.loading import model_fingerprint

FORMAT = "ace_lightning.adapter/1"


class AdapterError(ValueError):
    """An adapter file is corrupted, of another format, or made for another base model."""


def save_adapter(path, bank: AdapterBank, requests, base_model: str, fingerprint: str, targets, config_yaml: str = "") -> Path:
    from safetensors.torch import save_file

    from ace_lightning.utils import atomic_save

    concepts = []
    for req in requests:
        ad = bank[req.concept]
        concepts.append({"concept": req.concept, "kind": req.kind, "neutral": req.neutral, "synonyms": list(req.synonyms),
                         "rank": ad.A.shape[0], "q": ad.Q.shape[1], "gated": bool(ad.gamma.requires_grad)})
    meta = {
        "format": FORMAT, "concepts": json.dumps(concepts), "base_model": str(base_model), "fingerprint": fingerprint,
        "targets": json.dumps(list(targets)), "config": config_yaml, "ace_lightning_version": __version__,
    }
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in bank.state_dict().items()}
    atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return Path(path)


def read_adapter(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and parsed metadata; AdapterError for anything that is not a readable ACE adapter."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise AdapterError(f"{path} is not a readable safetensors file (corrupted or truncated?): {e}") from e
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{path} is not an ace_lightning adapter (format {meta.get('format')!r}, expected {FORMAT!r})")
    meta = dict(meta, concepts=json.loads(meta["concepts"]), targets=json.loads(meta["targets"]))
    return tensors, meta


def load_into(unet, path, check_fingerprint: bool = True) -> AdapterBank:
    """Inject an adapter file into ``unet`` (which must carry none)."""
    tensors, meta = read_adapter(path)
    if check_fingerprint:
        fp = model_fingerprint(unet, meta["targets"])
        if fp != meta["fingerprint"]:
            raise AdapterError(
                f"adapter {path} was made for base model {meta['base_model']!r} (fingerprint {meta['fingerprint']}), "
                f"but this UNet's edited projections have fingerprint {fp}: refusing to apply it to another model"
            )
    bank = inject(unet, meta["targets"])
    try:
        for c in meta["concepts"]:
            ad = bank.add_concept(c["concept"], rank=c["rank"], q=c["q"])
            if not c.get("gated", True):
                ad.gamma.requires_grad_(False)
                ad.tau.requires_grad_(False)
        bank.load_state_dict(tensors, strict=True)
    except (RuntimeError, KeyError) as e:
        remove(unet)
        raise AdapterError(f"adapter {path} does not match this UNet's layers: {e}") from e
    p = next(unet.parameters())
    bank.to(p.device)
    bank.requires_grad_(False)
    return bank


def apply_adapter(pipe, path):
    """Apply an ACE adapter to a stock diffusers pipeline; refuses a mismatching base model."""
    if bank_of(pipe.unet) is not None:
        raise AdapterError("this pipeline already carries an ACE adapter; call remove_adapter(pipe) first")
    load_into(pipe.unet, path)
    return pipe


def remove_adapter(pipe):
    """Restore the pipeline's original projections (outputs equal the untouched model bit-for-bit)."""
    remove(pipe.unet)
    return pipe
