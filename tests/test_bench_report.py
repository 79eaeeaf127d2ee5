"""Benchmark reports are written atomically: a write that fails part-way leaves the previous file intact.

The fault is injected at the file layer, below every writer the reports use (``json``/text writes, PIL's
``Image.save`` and matplotlib's ``savefig``): every file opened for writing under the output folder writes part
of its first chunk, then fails with "No space left on device". Writing in place truncates the previous report
and leaves a fragment; writing to a temporary name and renaming leaves the previous report untouched.
"""
import builtins
import errno
import io
import json
import math
import os
from pathlib import Path

import pytest
import torch

from ace_lightning.bench import report
from ace_lightning.bench.generation import image_path, save_png
from ace_lightning.bench.suites import PromptRow

SETTINGS = {"suite": "tiny", "run": "base+circle", "sampler": {"scheduler": "ddim", "steps": 2}, "images_per_prompt": 1,
            "seed": 0, "model": "tiny", "erased": ["circle"], "scorers": {"s0": {"scorer": "toy_classifier"}}}


def _results(scale: float) -> dict:
    return {v: {"bench/Acc_e": 100.0 * scale * (i == 0), "bench/Acc_s": 90.0 * scale, "bench/Acc_g": float("nan"),
                "bench/H_o": float("nan"), "bench/n_images": 4.0} for i, v in enumerate(("base", "circle"))}


def _rows(out: Path, value: float) -> list[PromptRow]:
    rows = []
    for v in ("base", "circle"):
        for i, g in enumerate(("erased", "retained")):
            r = PromptRow(suite="tiny", index=i, prompt=f"a picture of a {g}", seed=0, group=g, variant=v)
            save_png(torch.full((3, 8, 8), value), image_path(out, r))
            rows.append(r)
    return rows


class _FailingFile:
    """A file whose writes put part of the data on disk, then fail as on a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: max(1, len(data) // 2)])
        self._f.flush()
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def _disk_fills_under(monkeypatch, folder: Path):
    real_open = io.open
    folder = os.path.realpath(folder)

    def failing_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
        if any(c in mode for c in "wax+") and os.path.realpath(name).startswith(folder + os.sep):
            return _FailingFile(f)
        return f

    monkeypatch.setattr(io, "open", failing_open)  # pathlib, os.fdopen
    monkeypatch.setattr(builtins, "open", failing_open)  # PIL, matplotlib, plain open()


WRITERS = {
    "metrics.json": lambda out, rows, k: report.write_metrics_json(out, _results(k), SETTINGS, {"generated": int(k)}),
    "metrics.md": lambda out, rows, k: report.write_markdown(out, _results(k), SETTINGS),
    "grid.png": lambda out, rows, k: report.image_grid(out, rows, ["base", "circle"], 2),
    "metrics.png": lambda out, rows, k: report.bar_chart(out, _results(k)),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_failed_write_keeps_the_previous_report(name, tmp_path, monkeypatch):
    out = tmp_path / "run"
    write = WRITERS[name]
    write(out, _rows(out, 0.25), 1.0)
    path = out / name
    old = path.read_bytes()
    assert old
    rows = _rows(out, 0.75)  # new images: the grid would change
    with monkeypatch.context() as m:
        _disk_fills_under(m, out)
        with pytest.raises(OSError, match="No space left"):
            write(out, rows, 0.5)
    assert path.read_bytes() == old, f"{name} was truncated/overwritten by a failed write"
    assert not [p.name for p in out.iterdir() if p.name.startswith(f".{name}")]  # no temp file left behind
    write(out, rows, 0.5)  # and without the fault, the new report replaces the old one
    assert path.read_bytes() != old


def test_metrics_json_keeps_variant_order_and_nan(tmp_path):
    results = {"base": {"bench/H_o": float("nan"), "bench/Acc_e": 100.0}, "circle": {"bench/Acc_e": 0.0}}
    report.write_metrics_json(tmp_path, results, SETTINGS, {})
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert list(m) == ["settings", "results", "generation"] and list(m["results"]) == ["base", "circle"]
    assert math.isnan(m["results"]["base"]["bench/H_o"]) and m["results"]["base"]["bench/Acc_e"] == 100.0
    md = report.write_markdown(tmp_path, results, SETTINGS).read_text()
    assert md == report.markdown_table(results, SETTINGS) and "| base | 100.00 | nan |" in md
