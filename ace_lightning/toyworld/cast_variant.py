"""The cast variant of ToyWorld (``model=toyworld-cast``): the shipped model plus the 150 names of the cast stage.

The cast stage trains only the token-embedding rows of the new names' BPE pieces (:mod:`.cast_stage`), so the
variant ships as those rows (``assets/cast/token_rows.safetensors``, 299 x 128 in float16: 77 kB) instead of a
second model. On first use they are written into a copy of the shipped pipeline, under the model cache
(``$ACE_MODEL_CACHE``, default ``~/.cache/ace_lightning/models``), keyed by the hash of the rows and of the base
text encoder, so a rebuilt model never meets a stale copy. The copy is assembled in a temporary folder and renamed
into place: a crash leaves no half-written model behind.

Why a variant and not the default model: with the names in the default model's vocabulary, the generic recipe's
'dotted' and 'circle' erasure tests fail (docs/SCALE.md traces it: the names' last pieces are vocabulary words that
carry a whole look, and the gate fit shuts on them). Every ToyWorld number outside docs/SCALE.md is the base model's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ace_lightning.utils import atomic_save, file_digest

from . import ASSETS_DIR, PIPELINE_DIR

CAST_DIR = ASSETS_DIR / "cast"
ROWS_FILE = "token_rows.safetensors"
TEXT_ENCODER_FILE = Path("text_encoder") / "model.safetensors"
ALIAS = "toyworld-cast"


def model_cache() -> Path:
    """Where materialised model variants live: ``$ACE_MODEL_CACHE`` or ``~/.cache/ace_lightning/models``."""
    return Path(os.environ.get("ACE_MODEL_CACHE") or Path.home() / ".cache" / "ace_lightning" / "models").expanduser()


def _embedding_key(state: dict) -> str:
    keys = [k for k in state if k.endswith("embeddings.token_embedding.weight")]
    if len(keys) != 1:
        raise KeyError(f"expected one token-embedding table in the text encoder, found {keys}")
    return keys[0]


def save_cast_rows(base_file: Path, cast_file: Path, out: Path) -> dict:
    """Write the rows where the cast text encoder ``cast_file`` differs from ``base_file`` (both
    ``model.safetensors``) to ``out``: ``ids`` (K,) int64 and ``rows`` (K, d) in the file's dtype. Refuses if any
    other tensor differs (the cast stage trains the token rows only). Returns {"rows": K, "dim": d}."""
    from safetensors.torch import load_file, save_file

    base, cast = load_file(str(base_file)), load_file(str(cast_file))
    if set(base) != set(cast):
        raise ValueError(f"{cast_file} and {base_file} hold different tensors")
    key = _embedding_key(base)
    other = [k for k in base if k != key and not torch.equal(base[k], cast[k])]
    if other:
        raise ValueError(f"{cast_file} differs from {base_file} outside the token rows: {other[:5]}")
    ids = (base[key] != cast[key]).any(1).nonzero().flatten()  # (K,)
    atomic_save(out, lambda tmp: save_file({"ids": ids.to(torch.int64), "rows": cast[key][ids].contiguous()}, tmp,
                                           metadata={"base_text_encoder_sha256": _sha256(base_file)}))
    return {"rows": int(len(ids)), "dim": int(cast[key].shape[1])}


def _sha256(path: Path) -> str:
    return file_digest(path, 64)  # the whole digest


def cast_pipeline_dir(assets: Path = ASSETS_DIR, cache: Path | None = None) -> Path:
    """The cast variant as a diffusers folder (materialised once; see the module's docstring)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    pipeline, rows_file = assets / PIPELINE_DIR.name, assets / CAST_DIR.name / ROWS_FILE
    base_file = pipeline / TEXT_ENCODER_FILE
    for f in (base_file, rows_file):
        if not f.is_file():
            raise FileNotFoundError(f"the ToyWorld cast variant needs {f}; build it with `make toyworld`")
    with safe_open(str(rows_file), framework="pt") as h:
        meta = h.metadata() or {}
    base_sha = _sha256(base_file)
    if meta.get("base_text_encoder_sha256") not in (None, base_sha):
        raise ValueError(f"{rows_file} was made for another ToyWorld text encoder than {base_file}; rebuild the cast "
                         "with `make toyworld ARGS=\"--continue-from <assets> --force\"`")
    key = hashlib.sha256((base_sha + _sha256(rows_file)).encode()).hexdigest()[:12]
    target = (cache or model_cache()) / f"{ALIAS}-{key}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ALIAS}-", dir=target.parent))
    try:
        shutil.copytree(pipeline, tmp, dirs_exist_ok=True)
        state, delta = load_file(str(base_file)), load_file(str(rows_file))
        table = state[_embedding_key(state)]  # (vocab, d)
        table[delta["ids"]] = delta["rows"].to(table.dtype)
        save_file(state, str(tmp / TEXT_ENCODER_FILE), metadata={"format": "pt"})
        try:
            os.replace(tmp, target)  # atomic; another process may have won the race
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
