"""What the dense-weight methods (ESD, AdvUnlearn) share: a trainable copy of one pipeline part next to the frozen
model, the unconditional embedding ε(x_t, ∅) needs, checkpoints that hold only the trained weights, and an adapter
file of their deltas."""

from __future__ import annotations

import contextlib
import copy

import lightning as L
import torch

from ace_lightning.models.conditioning import unet_eps
from ace_lightning.models.sampling import training_noise_scheduler


class DenseDeltaSystem(L.LightningModule):
    """``student``: a float32 copy of the pipeline's ``part`` (unet or text_encoder) in which only the weights named in
    ``trained`` learn. The frozen ``unet`` and ``text_encoder`` stay outside the module (never trained, never saved);
    ``uncond`` is the frozen text encoder's embedding of the empty prompt (1, T, d). ``optimizer``: params ->
    optimizer (``method.optim.optimizer_factory`` of the ``optim`` section)."""

    def __init__(self, components, part: str, trained: list[str], optimizer):
        super().__init__()
        object.__setattr__(self, "components", components)
        object.__setattr__(self, "unet", components.unet)
        object.__setattr__(self, "text_encoder", components.text_encoder)
        object.__setattr__(self, "frozen_part", getattr(components, part))
        self.noise_scheduler = training_noise_scheduler(components.scheduler)
        self.part = part
        self.make_optimizer = optimizer
        self.student = copy.deepcopy(self.frozen_part).float()
        self.student.train()  # (dropout is whatever the model config says)
        self.trained = list(trained)
        keep = set(self.trained)
        for n, p in self.student.named_parameters():
            p.requires_grad_(n in keep)
        self.strict_loading = False  # checkpoints hold only the trained weights
        self.register_buffer("uncond", torch.zeros(0), persistent=False)

    def setup(self, stage: str) -> None:
        self.unet.to(self.device).requires_grad_(False)
        self.text_encoder.to(self.device).requires_grad_(False)
        self.uncond = self.components.unconditional().to(self.device)  # (1, T, d); SDXL: the pipeline's zeros

    def _unet(self, x, t, c):
        """The frozen UNet's float32 prediction (inputs cast to its dtype)."""
        return unet_eps(self.unet, x, t, c).float()

    def configure_optimizers(self):
        return self.make_optimizer([p for p in self.student.parameters() if p.requires_grad])

    def on_save_checkpoint(self, checkpoint):
        keep = {f"student.{n}" for n in self.trained}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    @contextlib.contextmanager
    def pipeline(self, edited: bool = True):
        """A stock pipeline over the frozen components, with the trained copy in place of its part when ``edited``."""
        import dataclasses

        comps = dataclasses.replace(self.components, **{self.part: self.student}) if edited else self.components
        yield comps.pipeline()

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
