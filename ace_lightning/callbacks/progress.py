"""One training progress bar: what is being erased, steps done of ``max_steps``, the loss. Lightning's own bar
reads ``Epoch 0/-2`` for step-based training and shows the logger's version number."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class ErasureProgressBar(TQDMProgressBar):
    def __init__(self, label: str, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.label = label

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.set_description(f"erasing {self.label}")
        return bar

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        super().on_train_epoch_start(trainer, *args, **kwargs)
        self.train_progress_bar.set_description(f"erasing {self.label}")

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
