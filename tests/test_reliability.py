"""Reliability (issue 9): no lost runs, nonsense refused, corrupted adapters refused."""

import re

import pytest
import torch
from test_training import tiny_args, tiny_cfg

from ace_lightning.train import RunExistsError, run


def test_rerun_into_the_same_folder_is_refused_or_replaced_cleanly(tiny_model_dir, tmp_path):
    first = run(tiny_cfg(tiny_model_dir, tmp_path, "trainer.max_steps=4", "trainer.checkpoint_every=2"))
    assert first["train/global_step"] == 4
    adapter = (tmp_path / "dog" / "adapter.safetensors").read_bytes()
    with pytest.raises(RunExistsError, match="ckpt_path=last.*name=.*overwrite=true"):
        run(tiny_cfg(tiny_model_dir, tmp_path, "trainer.max_steps=2"))
    assert (tmp_path / "dog" / "adapter.safetensors").read_bytes() == adapter  # the first run is intact

    second = run(tiny_cfg(tiny_model_dir, tmp_path, "trainer.max_steps=2", "trainer.checkpoint_every=2",
                          "overwrite=true"))
    assert second["train/global_step"] == 2
    ckpts = sorted(p.name for p in (tmp_path / "dog" / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt"], ckpts  # no stale last.ckpt of the first run, no last-v1.ckpt
    assert torch.load(tmp_path / "dog" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    resumed = run(tiny_cfg(tiny_model_dir, tmp_path, "trainer.max_steps=3", "ckpt_path=last"))
    assert resumed["train/global_step"] == 3  # resumes the second run (step 2), not the first (step 4)


def test_adapter_with_nan_or_inf_is_refused(tiny_components, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from test_regressions import _adapter_file

    from ace_lightning import apply_adapter
    from ace_lightning.export import AdapterError

    good = _adapter_file(tiny_components, tmp_path)
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    pipe = tiny_components.pipeline()
    for bad_value in (float("nan"), float("inf")):
        t = dict(tensors)
        key = next(k for k in t if k.endswith(".A"))
        t[key] = t[key].clone()
        t[key][0, 0] = bad_value
        bad = tmp_path / f"bad_{bad_value}.safetensors"
        save_file(t, str(bad), metadata=meta)
        with pytest.raises(AdapterError, match="NaN or Inf"):
            apply_adapter(pipe, bad)
        from ace_lightning.method.adapter import bank_of

        assert bank_of(pipe.unet) is None  # the pipeline is left untouched
    apply_adapter(pipe, good)  # the intact file still applies


def test_outputs_follow_the_umask(tmp_path):
    import os

    from ace_lightning.utils import atomic_save, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_save(tmp_path / "b.bin", lambda p: open(p, "wb").write(b"y"))
    finally:
        os.umask(old)
    assert oct((tmp_path / "a.txt").stat().st_mode & 0o777) == oct(0o644)  # old code: 0o600 (mkstemp's mode)
    assert oct((tmp_path / "b.bin").stat().st_mode & 0o777) == oct(0o644)


def test_bench_cli_errors_are_one_line():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ace_lightning.bench.run", "suite=no-such-suite"], capture_output=True,
                          text=True, env={**__import__("os").environ, "ACE_DEBUG": ""}, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:"), proc.stderr[-500:]
    assert "Traceback" not in proc.stderr


def test_truncated_weights_file_is_named(tiny_model_dir, tmp_path):
    import shutil

    from ace_lightning.models.loading import ModelNotFoundError, load_components

    model = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, model)
    weights = next((model / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelNotFoundError, match=r"unet/diffusion_pytorch_model.safetensors is incomplete or corrupt"):
        load_components(str(model))


def test_resume_continues_the_same_wandb_run(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run(tiny_cfg(tiny_model_dir, tmp_path, "trainer.max_steps=2", "trainer.checkpoint_every=2", "logger.wandb=true"))
    run(tiny_cfg(tiny_model_dir, tmp_path, "trainer.max_steps=3", "ckpt_path=last", "logger.wandb=true"))
    runs = sorted((tmp_path / "dog" / "wandb").glob("offline-run-*"))
    # offline-run-<date>_<time>-<id>[-<n> when two start in the same second]: one run id, resumed
    ids = {re.match(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)", r.name).group(1) for r in runs}
    assert len(runs) == 2 and len(ids) == 1, runs


def test_console_shows_progress_and_nothing_else(tiny_model_dir, tmp_path):
    """A normal run prints what is loaded, the closed form and its time, one progress bar and where the outputs
    went; none of the notices that ask nothing of the user (each was printed before this was fixed)."""
    import os
    import subprocess
    import sys

    args = tiny_args(tiny_model_dir, tmp_path, "trainer.max_steps=3", "logger.wandb=true",
                     "trainer.enable_progress_bar=true")
    env = dict(os.environ, WANDB_MODE="offline")
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-m", "ace_lightning.train", *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    for expected in ("erasing dog from", "closed form: 1 concept(s)", "erasing dog: 100%", "3/3",
                     "wandb: offline run", f"adapter: {tmp_path / 'dog' / 'adapter.safetensors'}"):
        assert expected in console, (expected, console[-3000:])
    for noise in ("Epoch 0/-2", "anonymous", "accelerate", "Tip", "LeafSpec", "torch_dtype", "Seed set",
                  "v_num", "TPU available", "Run history", "Warning", "warn"):
        assert noise not in console, (noise, console[-3000:])
