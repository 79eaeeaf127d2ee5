"""Reports of a benchmark run: metrics.json, a Markdown table, base-vs-erased image grids, a bar chart.

Every file is written atomically (to a temporary name in the same folder, then renamed), like the rest of the
package: a run that fails or is killed while writing leaves the previous report intact, never a fragment."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ace_lightning.bench.generation import image_path, load_png
from ace_lightning.bench.suites import PromptRow
from ace_lightning.utils import atomic_save, atomic_write_text

# the headline numbers of each metric set, in table order (everything is in metrics.json)
HEADLINE = ("Acc_e", "Acc_s", "Acc_g", "Acc_look", "H_o", "H_c", "Acc_e_prob", "Acc_s_prob", "Acc_g_prob", "H_o_prob", "H_c_prob",
            "CS_e", "CS_s", "CS_g", "H_a", "nudenet_total", "nudenet_any", "FID", "CLIP_score", "ASR_pre")


def _fmt(x: float) -> str:
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.2f}"


def headline_keys(results: dict[str, dict[str, float]]) -> list[str]:
    keys = sorted({k for r in results.values() for k in r})
    order = {name: i for i, name in enumerate(HEADLINE)}
    order |= {k.rsplit("/", 1)[-1]: len(HEADLINE) for k in keys if k.rsplit("/", 1)[-1].startswith("ASR_")}  # attacks
    picked = [k for k in keys if k.rsplit("/", 1)[-1] in order]
    return sorted(picked, key=lambda k: (k.count("/"), k.rsplit("/", 2)[-2] if k.count("/") > 1 else "",
                                         order[k.rsplit("/", 1)[-1]]))


def markdown_table(results: dict[str, dict[str, float]], settings: dict) -> str:
    keys = headline_keys(results)
    lines = [f"# {settings['suite']} — run `{settings['run']}`", ""]
    lines.append("| variant | " + " | ".join(f"`{k}`" for k in keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    for v, r in results.items():
        lines.append(f"| {v} | " + " | ".join(_fmt(r.get(k, float("nan"))) for k in keys) + " |")
    s = settings
    lines += ["", f"Sampler: {s['sampler']}; images per prompt {s['images_per_prompt']}, seeds from {s['seed']}; "
              f"model `{s['model']}`; erased: {s['erased']}.",
              "Acc_* are argmax shares, Acc_*_prob mean true-class probabilities, in percent; CS_* are CLIP scores "
              "(100 * max(cos, 0)); H_a = CS_s - CS_e.", ""]
    for tag, info in s["scorers"].items():
        lines.append(f"- scorer `{tag}`: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return "\n".join(lines) + "\n"


def write_metrics_json(out: Path, results: dict, settings: dict, timing: dict) -> Path:
    path = out / "metrics.json"
    # not atomic_write_json: its sort_keys would reorder the variants (the last one is the primary)
    atomic_write_text(path, json.dumps({"settings": settings, "results": results, "generation": timing}, indent=2,
                                       default=str, allow_nan=True))
    return path


def write_markdown(out: Path, results: dict, settings: dict) -> Path:
    path = out / "metrics.md"
    atomic_write_text(path, markdown_table(results, settings))
    return path


def image_grid(out: Path, rows: list[PromptRow], variants: list[str], n_prompts: int, name: str = "grid.png") -> Path | None:
    """One row per (erased prompt, seed), one column per variant: the same seed in every column."""
    chosen = [r for r in rows if r.variant == variants[0] and r.group in ("erased", "synonym")]
    chosen = chosen or [r for r in rows if r.variant == variants[0]]
    seen, picked = set(), []
    for r in chosen:  # one image per prompt
        if r.index not in seen:
            seen.add(r.index)
            picked.append(r)
    picked = picked[:n_prompts]
    if not picked:
        return None
    tiles = []
    for r in picked:
        row_imgs = []
        for v in variants:
            p = image_path(out, PromptRow(**{**r.as_dict(), "variant": v}))
            row_imgs.append(load_png(p) if p.is_file() else torch.zeros(3, 8, 8))
        tiles.append(row_imgs)
    return tile_grid(out / name, [v[:16] for v in variants],
                     [f"{r.prompt[:34]}\nseed {r.seed} ({r.group})" for r in picked], tiles)


def tile_grid(path: Path, col_labels: list[str], row_labels: list[str], tiles: list[list[torch.Tensor]],
              label_w: int = 220, head: int = 16) -> Path:
    """A labelled grid of (3, H, W) images in [0, 1] (``tiles[i][j]``: row i, column j), saved atomically as a
    PNG; tiny ToyWorld images are upscaled (nearest) so they are visible."""
    from PIL import Image, ImageDraw

    h, w = tiles[0][0].shape[-2:]
    scale = max(1, 96 // max(h, w))
    cell = (h * scale, w * scale)
    canvas = Image.new("RGB", (label_w + len(col_labels) * (cell[1] + 4), head + len(tiles) * (cell[0] + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, c in enumerate(col_labels):
        draw.text((label_w + j * (cell[1] + 4), 2), c, fill="black")
    for i, (label, imgs) in enumerate(zip(row_labels, tiles, strict=True)):
        y = head + i * (cell[0] + 4)
        draw.text((2, y + 2), label, fill="black")
        for j, img in enumerate(imgs):
            arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((cell[1], cell[0]), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (cell[1] + 4), y))
    atomic_save(path, lambda tmp: canvas.save(tmp, format="PNG"))
    return path


def bar_chart(out: Path, results: dict[str, dict[str, float]], name: str = "metrics.png") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in headline_keys(results) if not k.endswith("_prob") and "FID" not in k and "nudenet" not in k]
    if not keys:
        keys = headline_keys(results)
    if not keys:
        return None
    variants = list(results)
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(keys) + 1), 3.2))
    for i, v in enumerate(variants):
        vals = [results[v].get(k, float("nan")) for k in keys]
        ax.bar([x + i * width for x in range(len(keys))], vals, width, label=v)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))])
    ax.set_xticklabels([k.removeprefix("bench/") for k in keys], rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title(out.parent.name + " / " + out.name, fontsize=9)
    fig.tight_layout()
    path = out / name
    try:
        atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return path
