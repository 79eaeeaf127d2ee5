"""Small shared helpers: atomic writes (nothing half-written survives a crash)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _default_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give: 0o666 minus the user's umask (mkstemp makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Create ``path`` and write a probe file in it, or raise a ConfigError naming the setting ``what``."""
    from ace_lightning.registry import ConfigError

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"{what} {path} is not writable: {e.strerror or e}") from None


def atomic_save(path: str | os.PathLike, save_fn) -> None:
    """Call ``save_fn(tmp_path)`` then rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        save_fn(tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _DropNotices:
    """A logging filter that drops records whose message contains one of ``needles``."""

    def __init__(self, *needles: str):
        self.needles = needles

    def filter(self, record) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.needles)


def quiet_known_notices() -> None:
    """Silence, deliberately and only these, the notices a normal run printed that ask nothing of the user:
    diffusers' "install accelerate for low cpu memory usage" (loading works the same without it) and
    Lightning's advertising tip for its cloud logger."""
    import logging

    for name, needles in (("diffusers.models.modeling_utils", ("low cpu memory usage",)),
                          ("lightning.pytorch.utilities.rank_zero", ("💡 Tip", "litlogger"))):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in log.filters):  # idempotent
            log.addFilter(_DropNotices(*needles))
