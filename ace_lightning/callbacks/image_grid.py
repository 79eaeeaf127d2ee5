"""Before/after image grid: the same seeds with adapters disabled (before) and enabled (after)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from ace_lightning.models.sampling import SamplerSettings, generate


def grid_prompts(dm, n_preserve: int) -> list[str]:
    """One canonical erase prompt and one synonym prompt per concept, then a few preserve prompts."""
    out = []
    for cd in dm.concepts:
        canon = [p for p, ph in zip(cd.prompts, cd.phrases) if ph == cd.request.concept][:1]
        syn = [p for p, ph in zip(cd.prompts, cd.phrases) if ph in cd.request.synonyms][:1]
        out += canon + syn
    return out + dm.preserve_prompts[:n_preserve]


def save_grid(path: Path, prompts: list[str], before: torch.Tensor, after: torch.Tensor, n_seeds: int) -> Path:
    """Rows = prompts; left half before, right half after. ``before``/``after``: (P*S, 3, H, W) in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ace_lightning.utils import atomic_save

    P, S = len(prompts), n_seeds
    fig, axes = plt.subplots(P, 2, figsize=(2 * 0.9 * S + 1, 0.95 * P + 0.6), squeeze=False)
    for i, prompt in enumerate(prompts):
        for j, (imgs, title) in enumerate(((before, "before"), (after, "after"))):
            row = imgs[i * S : (i + 1) * S]  # (S, 3, H, W)
            strip = torch.cat(list(row), dim=2).permute(1, 2, 0).clamp(0, 1).numpy()  # (H, S*W, 3)
            ax = axes[i, j]
            ax.imshow(strip, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
            if j == 0:
                ax.set_ylabel(prompt, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


class ImageGrid(L.Callback):
    def __init__(self, out_path: Path, sampler: SamplerSettings, seeds: list[int], n_preserve: int):
        self.out_path, self.sampler, self.seeds, self.n_preserve = Path(out_path), sampler, list(seeds), n_preserve

    def render(self, system, dm) -> Path:
        prompts = grid_prompts(dm, self.n_preserve)
        rows = [p for p in prompts for _ in self.seeds]
        seeds = [s for _ in prompts for s in self.seeds]
        kw = {"steps": self.sampler.steps, "guidance": self.sampler.guidance, "progress": False}
        images = {}
        with torch.no_grad():
            for edited in (False, True):  # every method's system gives its pipeline before and after its edit
                with system.pipeline(edited) as pipe:
                    images[edited] = generate(self.sampler.apply(pipe), rows, seeds, **kw)
        before, after = images[False], images[True]
        return save_grid(self.out_path, prompts, before, after, len(self.seeds))

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        path = self.render(pl_module, trainer.datamodule)
        for lg in trainer.loggers:
            if hasattr(lg, "log_image"):
                lg.log_image("train/grid", [str(path)])
