"""What the dense-weight methods (ESD, AdvUnlearn) share: a trainable copy of one pipeline part next to the frozen
original, checkpoints that hold only the trained weights, and an adapter file of their deltas."""

from __future__ import annotations

import copy

import lightning as L
import torch


class DenseDeltaSystem(L.LightningModule):
    """``student``: a float32 copy of ``frozen`` (the pipeline's ``part``: unet or text_encoder) in which only the
    weights named in ``trained`` learn; ``frozen`` stays outside the module (never trained, never saved)."""

    def __init__(self, part: str, frozen: torch.nn.Module, trained: list[str]):
        super().__init__()
        object.__setattr__(self, "frozen_part", frozen)
        self.part = part
        self.student = copy.deepcopy(frozen).float()
        self.student.train()  # (dropout is whatever the model config says)
        self.trained = list(trained)
        keep = set(self.trained)
        for n, p in self.student.named_parameters():
            p.requires_grad_(n in keep)
        self.strict_loading = False  # checkpoints hold only the trained weights

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.student.parameters() if p.requires_grad], lr=self.lr)

    def on_save_checkpoint(self, checkpoint):
        keep = {f"student.{n}" for n in self.trained}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    @torch.no_grad()
    def deltas(self) -> dict[str, torch.Tensor]:
        """``{"<part>.<name>": W_trained − W_frozen}`` for the trained weights."""
        base = dict(self.frozen_part.named_parameters())
        student = dict(self.student.named_parameters())
        return {f"{self.part}.{n}": student[n].float().cpu() - base[n].float().cpu() for n in self.trained}


class DenseDeltaMethod:
    """Saving and reporting for a method whose system is a :class:`DenseDeltaSystem`."""

    def save(self, path, system, requests, components, fingerprint, cfg, config_yaml):
        from ace_lightning.export import save_deltas

        save_deltas(path, system.deltas(), requests, components.source, fingerprint, cfg.adapter.targets, config_yaml,
                    unet=components.unet, method=cfg.method)

    def run_metrics(self, system, datamodule):
        return {}

    def stats(self):
        return {}
