"""Entry point: ``python -m ace_lightning.train concept=<name>[,<name>] [key=value ...]``.

config -> components, datamodule, system, callbacks, logger, trainer -> fit -> export -> metric dict.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import lightning as L
from omegaconf import OmegaConf

from ace_lightning.callbacks.cost import CostMeter
from ace_lightning.callbacks.image_grid import ImageGrid
from ace_lightning.callbacks.progress import ErasureProgressBar
from ace_lightning.config import load_config, scale_steps
from ace_lightning.data.datamodule import ErasureDataModule
from ace_lightning.data.prompts import ErasureRequest
from ace_lightning.method.adapter import concepts_slug
from ace_lightning.models.loading import (
    content_fingerprint,
    load_components,
    model_fingerprint,
    resolve_model_dir,
)
from ace_lightning.models.sampling import SamplerSettings
from ace_lightning.registry import ConfigError, build
from ace_lightning.utils import (
    atomic_write_json,
    atomic_write_text,
    check_writable,
    open_wandb_run,
    quiet_known_notices,
    run_cli,
    say,
    set_threads,
)


class RunExistsError(ConfigError):
    """The run folder already holds a run and neither resume nor overwrite was asked for."""


def run(cfg) -> dict:
    t0 = time.perf_counter()
    quiet_known_notices()
    t = cfg.trainer
    requests = [ErasureRequest(**OmegaConf.to_container(c)) for c in cfg.concepts]
    scale_steps(cfg)  # the step budget grows with the erased set (config.yaml records the steps run)
    name = cfg.name or concepts_slug([r.concept for r in requests])
    if not cfg.name and os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        name += f"-{os.environ['WANDB_RUN_ID']}"  # a wandb agent's runs: one folder each
    run_dir = Path(cfg.output_dir) / name
    ckpt_dir = run_dir / "checkpoints"
    ckpt = None
    if cfg.ckpt_path:
        ckpt = ckpt_dir / "last.ckpt" if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
        if not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint to resume from not found: {ckpt}")
    elif (run_dir / "adapter.safetensors").exists() or any(ckpt_dir.glob("*.ckpt")):
        if not cfg.overwrite:
            raise RunExistsError(
                f"{run_dir} already holds a run: resume it with ckpt_path=last, choose another folder with name=<run>, "
                "or replace it with overwrite=true")
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # never leave a stale last.ckpt for a later resume
    check_writable(run_dir, "output_dir")  # fail before any model is loaded, not after training
    check_writable(Path(cfg.data.cache_dir), "data.cache_dir")
    resolve_model_dir(cfg.model.path)  # a missing model fails here, before anything is loaded

    set_threads(t.threads, t.devices)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    say(f"erasing {', '.join(r.concept for r in requests)} from {cfg.model.path or 'ToyWorld'} -> {run_dir}")
    comps = load_components(cfg.model.path, cfg.model.dtype, cfg.model.device)
    fingerprint = model_fingerprint(comps.unet, cfg.adapter.targets)
    sampler = SamplerSettings(**OmegaConf.to_container(cfg.sampler))
    dm = ErasureDataModule(comps, requests, cfg.data, sampler, cfg.seed, cfg.trainer.max_steps,
                           content_fingerprint(comps))  # caches are keyed by every weight, not only W
    method = build("method", {"name": cfg.method})
    system, method_callbacks = method.build(comps, cfg, dm)
    meter = CostMeter(comps, system)
    callbacks = [
        *method_callbacks,
        meter,
        L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                            every_n_train_steps=cfg.trainer.checkpoint_every),
    ]
    if t.enable_progress_bar:
        callbacks.append(ErasureProgressBar("+".join(r.concept for r in requests)))
    if cfg.grid.enabled:
        callbacks.append(ImageGrid(run_dir / "grid.png", sampler, cfg.grid.seeds, cfg.grid.preserve_prompts))
    logger = False
    if cfg.logger.wandb:
        os.environ.setdefault("WANDB_MODE", cfg.logger.mode)
        # a resumed run continues the same wandb run (its id is kept in the run folder)
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if ckpt is not None and id_file.is_file() else None
        if run_id is None:  # a wandb agent's run id, so that the sweep sees this run's numbers
            import secrets

            run_id = os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4)  # lower-case alphanumerics
            atomic_write_text(id_file, run_id)
        experiment = open_wandb_run(cfg.logger.project, run_dir.name, run_dir, run_id,
                                    OmegaConf.to_container(cfg, resolve=True))
        logger = L.pytorch.loggers.WandbLogger(project=cfg.logger.project, save_dir=str(run_dir), name=run_dir.name,
                                               id=run_id, experiment=experiment)
    strategy = t.strategy
    if strategy == "auto" and t.devices > 1:  # a concept may be absent from one rank's batch: its gate gets no grad
        strategy = "ddp_find_unused_parameters_true"
    trainer = L.Trainer(
        max_steps=max(t.max_steps, 1), max_epochs=-1, accelerator=t.accelerator, devices=t.devices, strategy=strategy,
        precision=t.precision, log_every_n_steps=t.log_every_n_steps, gradient_clip_val=t.gradient_clip_val,
        enable_progress_bar=t.enable_progress_bar, callbacks=callbacks, logger=logger, default_root_dir=str(run_dir),
        limit_train_batches=None if t.max_steps > 0 else 0, num_sanity_val_steps=0, enable_model_summary=False,
    )
    trainer.fit(system, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)

    if trainer.global_rank == 0:
        config_yaml = OmegaConf.to_yaml(cfg)
        method.save(run_dir / "adapter.safetensors", system, requests, comps, fingerprint, cfg, config_yaml)
        atomic_write_text(run_dir / "config.yaml", config_yaml)
        atomic_write_json(run_dir / "prompts.json", dm.prompt_report())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    metrics.update(method.run_metrics(system, dm))
    metrics.update({"train/global_step": trainer.global_step, "run/seconds": time.perf_counter() - t0})
    metrics.update(meter.summary(dm, closed_form_seconds=metrics.get("closed_form/seconds", 0.0)))
    if cfg.eval.suite and trainer.global_rank == 0:
        bench = evaluate(cfg, run_dir)
        metrics.update(bench)
        if logger:  # the same wandb run as the training: a sweep reads its objective from there
            logger.log_metrics(bench, step=trainer.global_step)
    if trainer.global_rank == 0:
        atomic_write_json(run_dir / "metrics.json", {"metrics": metrics, "method": cfg.method, "stats": method.stats(),
                                                     "run_dir": str(run_dir), "fingerprint": fingerprint})
        say(f"trained {trainer.global_step} steps in {metrics['run/seconds']:.0f} s; outputs in {run_dir}:")
        outputs = ["adapter.safetensors", "metrics.json", "config.yaml", "prompts.json", "grid.png"]
        say("  " + "  ".join(f for f in outputs if (run_dir / f).is_file()))
        say(f"adapter: {run_dir / 'adapter.safetensors'}")
    if logger:  # close the wandb run: a later run in this process (a sweep, a resume) must not log into it
        import wandb

        wandb.finish()
    return metrics


def evaluate(cfg, run_dir: Path) -> dict[str, float]:
    """``cfg.eval``: the bench suite on the adapter just written, into ``<run>/eval`` (rebuilt every time: its images
    belong to this adapter). Returns the erased model's ``bench/*`` numbers and ``eval/seconds``."""
    from ace_lightning.bench.run import main as bench_main
    from ace_lightning.config import eval_args

    out = run_dir / "eval"
    shutil.rmtree(out, ignore_errors=True)
    say(f"evaluating the adapter on {cfg.eval.suite} -> {out}")
    t0 = time.perf_counter()
    results = bench_main(eval_args(cfg, run_dir / "adapter.safetensors", out))
    bench = {k: float(v) for k, v in results.items() if k.startswith("bench/")}
    return bench | {"eval/seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict:
    """The command line: user errors (config, missing model, bad adapter, existing run, missing files) print one
    line and exit 2; ``ACE_DEBUG=1`` shows the traceback instead."""
    return run_cli(lambda: run(load_config(sys.argv[1:] if argv is None else argv)), config_label="config error")


if __name__ == "__main__":
    main()
