"""Generation and scoring as Lightning systems over prompt rows.

Sharding: rows are cut into batches *globally* (per variant, in row order), and batch i goes to rank
i % world_size. So every image is computed inside the same batch whatever the number of ranks, and with
one seeded generator per row the PNG files are identical for 1 or N processes. Lightning's own
distributed sampler is switched off (it would pad shards with duplicates).

- `GenerationSystem.predict_step` generates a batch of one variant (base model, or base + one adapter:
  adapters are applied and removed as the variant changes); `ImageWriter` (a `BasePredictionWriter`)
  saves the PNGs atomically and appends each rank's rows to ``rows.rank<r>.jsonl``. Rows whose PNG exists
  are skipped before batching, which makes runs resumable.
- `ScoringSystem.test_step` reads the PNGs back (so fresh and resumed runs score identical pixels), runs
  each scorer once per batch and updates the metric sets of that batch's variant; torchmetrics reduces
  the states across ranks in `compute()`.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ace_lightning.bench.suites import PromptRow
from ace_lightning.utils import atomic_save, atomic_write_text


def image_path(out_dir: str | Path, row: PromptRow) -> Path:
    return Path(out_dir) / "images" / row.variant / row.image_name


def check_generation_settings(out_dir: str | Path, variants: dict[str, str | None], settings: dict,
                              recorded_only: tuple[str, ...] = ()) -> None:
    """Resuming reuses PNGs, so an output folder must never mix settings: each variant's image folder keeps
    a ``generation.json`` (model digest, dtype, sampler, adapter file + sha256) and a different one is an error.
    ``recorded_only``: settings written for the reader but not compared (the model's path: the same weights in
    another folder reuse the images, its digest tells a model rebuilt in place)."""
    from ace_lightning.registry import ConfigError
    from ace_lightning.utils import file_digest

    for name, adapter in variants.items():
        want = dict(settings, adapter=adapter, adapter_sha256=file_digest(adapter) if adapter else None)
        want = json.loads(json.dumps(want, default=str))
        path = Path(out_dir) / "images" / name / "generation.json"
        have = pin_settings(path, want, recorded_only)
        if have is not None:
            diff = sorted(k for k in want.keys() | have.keys() if k not in recorded_only and want.get(k) != have.get(k))
            raise ConfigError(f"{path.parent} holds images generated with other settings ({', '.join(diff)}: "
                              f"{[have.get(k) for k in diff]} vs now {[want.get(k) for k in diff]}); "
                              "use another out= or run= (or delete the folder)")


def pin_settings(path: Path, want: dict, recorded_only: tuple[str, ...] = ()) -> dict | None:
    """A folder's settings file: written with ``want`` the first time; afterwards the recorded settings when they
    differ from ``want`` (compared as JSON, without the ``recorded_only`` keys), else None. Reused images must never
    mix settings."""
    want = json.loads(json.dumps(want, default=str))
    if not path.is_file():
        atomic_write_text(path, json.dumps(want, indent=2))
        return None
    have = json.loads(path.read_text())

    def compared(d):
        return {k: v for k, v in d.items() if k not in recorded_only}

    return None if compared(have) == compared(want) else have


def make_batches(rows: list[PromptRow], batch_size: int) -> list[list[PromptRow]]:
    """Consecutive rows of the same variant, at most batch_size per batch."""
    batches: list[list[PromptRow]] = []
    for r in rows:
        if batches and batches[-1][0].variant == r.variant and len(batches[-1]) < batch_size:
            batches[-1].append(r)
        else:
            batches.append([r])
    return batches


class RowBatches(Dataset):
    """Pre-built batches of rows, this rank's share: batches[rank::world_size]. A rank left without work (fewer
    batches than ranks) gets one empty batch: Lightning refuses a zero-length loader, and the rank must still
    reach the collective calls (barrier, metric all-reduce) that the others wait in."""

    def __init__(self, batches: list[list[PromptRow]], rank: int = 0, world_size: int = 1) -> None:
        self.batches = batches[rank::world_size] or [[]]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> list[PromptRow]:
        return self.batches[i]


def _keep(batch):  # module-level so it pickles
    return batch


def row_loader(batches: list[list[PromptRow]], trainer: L.Trainer) -> DataLoader:
    ds = RowBatches(batches, trainer.global_rank, trainer.world_size)
    return DataLoader(ds, batch_size=None, shuffle=False, collate_fn=_keep, num_workers=0)


def save_png(img: torch.Tensor, path: Path) -> None:
    """(3, H, W) in [0, 1] -> 8-bit PNG, written to a temp name then renamed (no half-written files)."""
    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    atomic_save(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def load_png(path: Path) -> torch.Tensor:
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W)


class GenerationSystem(L.LightningModule):
    """Generates images for batches of rows; ``variants`` maps a variant name to an adapter path (None = base)."""

    rows_stem = "rows"  # ImageWriter appends the generated rows to <rows_stem>.rank<r>.jsonl

    def __init__(self, pipe_factory: Callable[[torch.device], object], variants: dict[str, str | None],
                 sampler: dict, batches: list[list[PromptRow]]) -> None:
        super().__init__()
        self.pipe_factory, self.variants, self.sampler, self.batches = pipe_factory, variants, sampler, batches
        self.pipe = None
        self._current: str | None = None

    def on_predict_start(self) -> None:
        # not in setup(): Lightning calls setup before moving the module to its device, and the pipeline
        # (not a submodule, so never wrapped or counted) must be built on this rank's device
        if self.pipe is None:
            self.pipe = self.pipe_factory(self.device)

    def predict_dataloader(self) -> DataLoader:
        return row_loader(self.batches, self.trainer)

    def _use_variant(self, name: str) -> None:
        if name == self._current:
            return
        if self._current is not None and self.variants.get(self._current):
            from ace_lightning import remove_adapter

            remove_adapter(self.pipe)
        if self.variants.get(name):
            from ace_lightning import apply_adapter

            apply_adapter(self.pipe, self.variants[name])
        self._current = name

    def predict_step(self, batch: list[PromptRow], batch_idx: int) -> dict:
        from ace_lightning.models.sampling import generate

        if not batch:  # the empty batch of a rank without work
            return {"rows": [], "images": [], "seconds": 0.0}
        self._use_variant(batch[0].variant)
        t0 = time.perf_counter()
        images = generate(
            self.pipe, [r.prompt for r in batch], [r.seed for r in batch], steps=int(self.sampler["steps"]),
            guidance=float(self.sampler["guidance"]), batch_size=len(batch), progress=False,
            eta=float(self.sampler.get("eta", 0.0)),
        )  # (B, 3, H, W) in [0, 1]
        return {"rows": batch, "images": images, "seconds": time.perf_counter() - t0}


class ImageWriter(BasePredictionWriter):
    """Saves each batch's PNGs and appends its rows to ``rows.rank<r>.jsonl``; records per-rank timing."""

    def __init__(self, out_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.n_images, self.seconds = 0, 0.0

    def on_predict_start(self, trainer, pl_module) -> None:
        self.n_images, self.seconds = 0, 0.0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        with open(self.out_dir / f"{pl_module.rows_stem}.rank{trainer.global_rank}.jsonl", "a") as f:
            for row, img in zip(prediction["rows"], prediction["images"], strict=True):
                save_png(img, image_path(self.out_dir, row))
                f.write(json.dumps(row.as_dict()) + "\n")
        self.n_images += len(prediction["rows"])
        self.seconds += prediction["seconds"]

    def on_predict_end(self, trainer, pl_module) -> None:
        name = "timing" if pl_module.rows_stem == "rows" else f"{pl_module.rows_stem}_timing"
        (self.out_dir / f"{name}.rank{trainer.global_rank}.json").write_text(
            json.dumps({"images": self.n_images, "seconds": self.seconds, "threads": torch.get_num_threads()})
        )


class ScoringSystem(L.LightningModule):
    """Scores every row's PNG: each scorer once per batch, then the metric sets of the batch's variant.

    ``metric_specs``: list of (tag, scorer key, metric factory); one metric instance per (variant, tag). Rows made
    by an attack only get their per-image scores written (``<stem>.rank<r>.jsonl``); they never enter the suite's
    metric sets.
    """

    def __init__(self, out_dir: str | Path, scorers: dict[str, nn.Module], metric_specs: list[tuple[str, str, Callable]],
                 variants: list[str], batches: list[list[PromptRow]], stem: str = "scores") -> None:
        super().__init__()
        self.out_dir, self.batches, self.variants, self.stem = Path(out_dir), batches, list(variants), stem
        self.scorers = nn.ModuleDict(scorers)
        self.specs = [(tag, skey) for tag, skey, _ in metric_specs]
        self.metric_sets = nn.ModuleDict({
            _key(v, i): factory() for v in self.variants for i, (_, _, factory) in enumerate(metric_specs)
        })
        self.results: dict[str, dict[str, float]] = {}

    def test_dataloader(self) -> DataLoader:
        return row_loader(self.batches, self.trainer)

    def test_step(self, batch: list[PromptRow], batch_idx: int) -> None:
        if not batch:  # the empty batch of a rank without work
            return
        images = torch.stack([load_png(image_path(self.out_dir, r)) for r in batch]).to(self.device)
        prompts = [r.prompt for r in batch]
        target = torch.tensor([r.target for r in batch], device=self.device)
        group = torch.tensor([r.group_id for r in batch], device=self.device)
        outputs = {k: s(images, prompts) for k, s in self.scorers.items()}
        if any(r.ref for r in batch):  # reference images (FID) travel with the images scorer
            ref = torch.stack([load_png(Path(r.ref)) for r in batch]).to(self.device)
            for o in outputs.values():
                if "images" in o:
                    o["reference"] = ref
        variant = batch[0].variant
        if not batch[0].attack:
            for i, (_, skey) in enumerate(self.specs):
                self.metric_sets[_key(variant, i)].update(outputs[skey], target, group)
        self._write_scores(batch, outputs)

    PER_ROW = ("pred", "probs", "clip_score")  # scorer outputs kept per image (for confidence intervals)

    def on_test_start(self) -> None:
        (self.out_dir / f"{self.stem}.rank{self.global_rank}.jsonl").unlink(missing_ok=True)  # rescored every run

    def _write_scores(self, batch: list[PromptRow], outputs: dict) -> None:
        """One line per (row, metric set): what the set's update saw for that image, so that ``make compare`` can
        resample prompts and recompute the suite's own numbers."""
        with open(self.out_dir / f"{self.stem}.rank{self.global_rank}.jsonl", "a") as f:
            for tag, skey in self.specs:
                o = {k: v.detach().cpu().tolist() for k, v in outputs[skey].items() if k in self.PER_ROW}
                if not o:
                    continue
                for j, r in enumerate(batch):
                    made_by = {"attack": r.attack, "restart": r.restart} if r.attack else {}
                    f.write(json.dumps({"variant": r.variant, "tag": tag, "index": r.index, "seed": r.seed,
                                        "group": r.group_id, "target": r.target, **made_by,
                                        **{k: v[j] for k, v in o.items()}}) + "\n")

    def compute_results(self) -> dict[str, dict[str, float]]:
        """Every rank must call this (after `trainer.test`), in the same order: compute() all-reduces the
        states. Not an epoch-end hook, because Lightning skips the hooks of a rank that got no batches."""
        for v in self.variants:
            res: dict[str, float] = {}
            for i, (tag, _) in enumerate(self.specs):
                vals = self.metric_sets[_key(v, i)].compute()
                res.update({f"bench/{tag + '/' if tag else ''}{k}": float(x) for k, x in vals.items()})
            self.results[v] = res
        return self.results


def _key(variant: str, i: int) -> str:
    return f"{variant}__{i}".replace(".", "_")
