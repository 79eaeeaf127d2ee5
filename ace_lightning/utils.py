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


def set_threads(threads: int, devices: int = 1) -> None:
    """torch's intra-op threads: ``threads``, or (0) the machine's cores shared by ``devices`` processes."""
    import torch

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, devices)))


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


def file_digest(path: str | os.PathLike, n: int = 16) -> str:
    """First n hex digits of the file's sha256 (recorded so a number can be traced to its weights)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_name_list(path: str | os.PathLike) -> list[str]:
    """The names in a list file: one a line, blank lines and ``#`` comments skipped (ConfigError if missing)."""
    from ace_lightning.registry import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"name list file {path} not found")
    lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
    return [ln for ln in lines if ln]


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
    diffusers' "install accelerate for low cpu memory usage" (loading works the same without it), its
    ``torch_dtype`` rename notice (the old name is the one every supported diffusers accepts), the per-component
    loading bars of diffusers and transformers, Lightning's advertising tip for its cloud logger, its "no TPU"
    line and its own deprecation notice from ``_pytree``."""
    import logging
    import warnings

    for name, needles in (("diffusers.models.modeling_utils", ("low cpu memory usage",)),
                          ("diffusers.pipelines.pipeline_utils", ("low cpu memory usage",)),
                          ("lightning.pytorch.utilities.rank_zero", ("💡 Tip", "litlogger", "TPU available: False",
                                                                      "GPU available: False", "Seed set to"))):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in log.filters):  # idempotent
            log.addFilter(_DropNotices(*needles))
    warnings.filterwarnings("ignore", message=r".*`torch_dtype` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def is_main_process() -> bool:
    """True except in the extra processes of a multi-process (DDP) run, before and after Lightning starts them."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def say(msg: str) -> None:
    """One line of progress for the user, printed once (by the main process)."""
    if is_main_process():
        print(msg, flush=True)


def open_wandb_run(project: str, name: str, save_dir: str | os.PathLike, run_id: str | None = None,
                   config: dict | None = None, stepped: bool = True):
    """Start (or resume, by ``run_id``) a wandb run quietly; ``stepped``: charted against ``trainer/global_step``
    as Lightning's WandbLogger would (hand the run to ``WandbLogger(experiment=...)``). One line says where the
    run is. Only in the main process; None elsewhere."""
    if not is_main_process():
        return None
    import wandb

    run = wandb.init(project=project, name=name, dir=str(save_dir), id=run_id, resume="allow", config=config,
                     settings=wandb.Settings(silent=True, console="off"))
    if run.offline:
        where = Path(run.dir).parent
        say(f"wandb: offline run {run.id} in {where} (upload: wandb sync {where})")
    else:
        say(f"wandb: {run.url}")
    if stepped:
        run.define_metric("trainer/global_step")
        run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    return run


def run_cli(main, config_label: str = "error"):
    """Return ``main()``; user errors print one line and exit 2: config errors (prefixed ``config_label``), bad
    adapters and anything missing (``FileNotFoundError``: model directories, scorer weights, checkpoints, files).
    ``ACE_DEBUG=1`` shows the traceback instead."""
    import sys

    from ace_lightning.export import AdapterError
    from ace_lightning.registry import ConfigError

    try:
        return main()
    except (ConfigError, AdapterError, FileNotFoundError) as e:
        if os.environ.get("ACE_DEBUG"):
            raise
        print(f"{config_label if isinstance(e, ConfigError) else 'error'}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
