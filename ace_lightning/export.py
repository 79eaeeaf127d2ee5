"""Adapter files (safetensors, no pickle) and applying them to stock diffusers pipelines (spec §7)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ace_lightning import __version__
from ace_lightning.method.adapter import AdapterBank, bank_of, inject, remove
from ace_lightning.models.loading import ROUNDOFF, model_fingerprint, signature_matches, weight_signature

FORMAT = "ace_lightning.adapter/1"


class AdapterError(ValueError):
    """An adapter file is corrupted, of another format, or made for another base model."""


def adapter_metadata(requests, base_model: str, fingerprint: str, targets, config_yaml: str = "", unet=None,
                     method: str = "ace", kind: str = "gated_lora", concept_fields=None) -> dict[str, str]:
    """The metadata every adapter file carries: format, kind (``gated_lora`` or ``delta``), method, concepts, base
    model and its fingerprint, targets, the run's config. ``unet`` (the base model, adapter attached or not) adds
    its dtype-independent weight signature and dtype, so the file also applies to that model in fp16/bf16."""
    concepts = []
    for req in requests:
        extra = concept_fields(req) if concept_fields else {}
        concepts.append({"concept": req.concept, "kind": req.kind, "neutral": req.neutral, "synonyms": list(req.synonyms),
                         **extra})
    meta = {
        "format": FORMAT, "kind": kind, "method": method, "concepts": json.dumps(concepts), "base_model": str(base_model),
        "fingerprint": fingerprint, "targets": json.dumps(list(targets)), "config": config_yaml,
        "ace_lightning_version": __version__,
    }
    if unet is not None:
        from ace_lightning.method.adapter import base_weights

        meta["signature"] = json.dumps(weight_signature(unet, targets))
        meta["base_dtype"] = str(next(iter(base_weights(unet, targets).values())).dtype).replace("torch.", "")
    return meta


def save_adapter(path, bank: AdapterBank, requests, base_model: str, fingerprint: str, targets, config_yaml: str = "",
                 unet=None, method: str = "ace") -> Path:
    """Write a gated low-rank bank as safetensors (see :func:`adapter_metadata`)."""
    def fields(req):
        ad = bank[req.concept]
        return {"rank": ad.A.shape[0], "q": ad.Q.shape[1], "gated": bool(ad.gated), "carry": bool(ad.carry),
                "q_neg": int(ad.q_neg)}

    meta = adapter_metadata(requests, base_model, fingerprint, targets, config_yaml, unet, method, "gated_lora", fields)
    return _write(path, bank.state_dict(), meta)


def _text_encoder_of(pipe):
    from ace_lightning.models.loading import text_encoder_of

    return text_encoder_of(pipe)


# the pipeline parts a dense delta may touch, and how to reach each in a stock pipeline: the UNet, or the text
# encoder as the package sees it (SDXL: both encoders as one, so names read ``text_encoder_2.<...>`` there)
DELTA_PARTS = {"unet": lambda pipe: pipe.unet, "text_encoder": _text_encoder_of}


def save_deltas(path, deltas: dict[str, torch.Tensor], requests, base_model: str, fingerprint: str, targets,
                config_yaml: str = "", unet=None, method: str = "esd_x") -> Path:
    """Write dense weight deltas ``{"<part>.<parameter name>": W_trained − W_base}`` (part: unet or
    text_encoder) as safetensors: only the changed weights, never a whole model."""
    bad = [k for k in deltas if k.split(".", 1)[0] not in DELTA_PARTS]
    if bad:
        raise ValueError(f"delta names must start with one of {tuple(DELTA_PARTS)}: {bad[:3]}")
    return _write(path, deltas, adapter_metadata(requests, base_model, fingerprint, targets, config_yaml, unet, method,
                                                  "delta"))


def _write(path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """float32 tensors and string metadata to a safetensors file, atomically."""
    from safetensors.torch import save_file

    from ace_lightning.utils import atomic_save

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
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
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise AdapterError(f"{path} holds NaN or Inf values in {bad[:3]}{' ...' if len(bad) > 3 else ''}: refusing it")
    meta = dict(meta, concepts=json.loads(meta["concepts"]), targets=json.loads(meta["targets"]),
                signature=json.loads(meta.get("signature", "[]")))
    return tensors, meta


def same_base_model(unet, meta) -> tuple[bool, str]:
    """Whether ``unet`` is the model ``meta`` was made for: the exact float32 fingerprint, or (for a model
    stored in another precision than the adapter's base) the weight signature within that precision's
    rounding. Returns (ok, this model's fingerprint)."""
    from ace_lightning.method.adapter import base_weights

    fp = model_fingerprint(unet, meta["targets"])
    if fp == meta["fingerprint"]:
        return True, fp
    if not meta["signature"]:
        return False, fp
    dtypes = {next(iter(base_weights(unet, meta["targets"]).values())).dtype,
              getattr(torch, meta.get("base_dtype", "float32"), torch.float32)}
    roundoff = max(ROUNDOFF.get(d, 2.0**-8) for d in dtypes)
    if roundoff <= ROUNDOFF[torch.float32]:  # both float32: only the exact fingerprint identifies the model
        return False, fp
    return signature_matches(meta["signature"], weight_signature(unet, meta["targets"]), roundoff), fp


def check_compatible(unet, path, meta: dict | None = None) -> dict:
    """AdapterError unless the adapter file at ``path`` was made for ``unet``'s base model; returns its metadata.
    Cheap (no adapter tensors are applied): used up front, before any expensive work."""
    if meta is None:
        _, meta = read_adapter(path)
    ok, fp = same_base_model(unet, meta)
    if not ok:
        raise AdapterError(
            f"adapter {path} was made for base model {meta['base_model']!r} (fingerprint {meta['fingerprint']}), "
            f"but this UNet's edited projections have fingerprint {fp} (and their weight signature differs by "
            "more than a change of precision explains): refusing to apply it to another model"
        )
    return meta


def load_into(unet, path, check_fingerprint: bool = True) -> AdapterBank:
    """Inject an adapter file into ``unet`` (which must carry none)."""
    return _inject(unet, path, *read_adapter(path), check_fingerprint=check_fingerprint)


def _inject(unet, path, tensors: dict[str, torch.Tensor], meta: dict, check_fingerprint: bool = True) -> AdapterBank:
    """:func:`load_into` for a file already read."""
    if meta.get("kind", "gated_lora") != "gated_lora":
        raise AdapterError(f"{path} holds {meta.get('method')} dense deltas, not gated factors: use apply_adapter(pipe, path)")
    if check_fingerprint:
        check_compatible(unet, path, meta)
    bank = inject(unet, meta["targets"])
    try:
        for c in meta["concepts"]:
            ad = bank.add_concept(c["concept"], rank=c["rank"], q=c["q"])
            ad.gated = bool(c.get("gated", True))
            ad.carry = bool(c.get("carry", False))  # files written before gate carry have token-wise gates
            ad.q_neg = int(c.get("q_neg", 0))  # files written before signed gates have none
        bank.load_state_dict(tensors, strict=True)
    except (RuntimeError, KeyError) as e:
        remove(unet)
        raise AdapterError(f"adapter {path} does not match this UNet's layers: {e}") from e
    p = next(unet.parameters())
    bank.to(p.device)
    bank.requires_grad_(False)
    return bank


def carries_adapter(unet) -> bool:
    return bank_of(unet) is not None or hasattr(unet, "_ace_delta_backup")


def apply_adapter(pipe, path):
    """Apply an adapter file (gated low-rank factors or dense deltas) to a stock diffusers pipeline; refuses a
    mismatching base model and leaves the pipeline untouched on any error."""
    if carries_adapter(pipe.unet):
        raise AdapterError("this pipeline already carries an ACE adapter; call remove_adapter(pipe) first")
    tensors, meta = read_adapter(path)  # read (and checked for NaN / Inf) once
    if meta.get("kind", "gated_lora") == "delta":
        check_compatible(pipe.unet, path, meta)
        _apply_deltas(pipe, path, tensors)
    else:
        _inject(pipe.unet, path, tensors, meta)
    return pipe


def _apply_deltas(pipe, path, tensors: dict[str, torch.Tensor]) -> None:
    """W += Δ for every named weight, keeping the originals so that removal restores them bit-for-bit."""
    backup: dict[str, torch.Tensor] = {}
    try:
        for name, delta in tensors.items():
            part, pname = name.split(".", 1)
            if part not in DELTA_PARTS:
                raise AdapterError(f"adapter {path}: delta {name!r} names no pipeline part {tuple(DELTA_PARTS)}")
            try:
                p = DELTA_PARTS[part](pipe).get_parameter(pname)
            except AttributeError as e:
                raise AdapterError(f"adapter {path} does not match this pipeline: no weight {name!r}") from e
            if p.shape != delta.shape:
                raise AdapterError(f"adapter {path}: {name} has shape {tuple(delta.shape)}, the model's {tuple(p.shape)}")
            backup[name] = p.detach().clone()
            with torch.no_grad():
                p.add_(delta.to(device=p.device, dtype=p.dtype))
    except BaseException:
        _restore(pipe, backup)
        raise
    pipe.unet._ace_delta_backup = backup


def _restore(pipe, backup: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, original in backup.items():
            part, pname = name.split(".", 1)
            DELTA_PARTS[part](pipe).get_parameter(pname).copy_(original)


def remove_adapter(pipe):
    """Restore the pipeline's original weights (outputs equal the untouched model bit-for-bit)."""
    backup = getattr(pipe.unet, "_ace_delta_backup", None)
    if backup is not None:
        _restore(pipe, backup)
        del pipe.unet._ace_delta_backup
    else:
        remove(pipe.unet)
    return pipe
