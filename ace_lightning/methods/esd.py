"""ESD (Gandikota et al. 2023, "Erasing Concepts from Diffusion Models"): fine-tune UNet weights so that

    ε'(x_t, c) → ε(x_t, ∅) − η (ε(x_t, c) − ε(x_t, ∅))        (frozen ε, negative guidance away from c)

``esd_x`` trains the cross-attention modules (every ``attn2`` weight), ``esd_u`` every other weight except the
time embedding and the output layers (the paper's "noxattn"). x_t: the frozen model's own samples of the concept
prompts (the shared latent cache), noised to a uniformly drawn t. The paper instead runs DDIM with the model being
edited down to t; both give samples of the concept at time t, this one without a sampling loop per step.
The adapter file holds the dense deltas of the trained weights only.
"""

from __future__ import annotations

import torch

from ace_lightning.method.losses import erase_loss
from ace_lightning.method.optim import optimizer_factory
from ace_lightning.methods.deltas import DenseDeltaMethod, DenseDeltaSystem
from ace_lightning.models.conditioning import unet_eps
from ace_lightning.registry import register

EXCLUDED_U = ("time_embedding.", "conv_out.", "conv_norm_out.")  # ESD's "noxattn" leaves these (and attn2) alone


def esd_parameter_names(unet: torch.nn.Module, which: str) -> list[str]:
    """``x``: the weights of every cross-attention module; ``u``: every other weight but the time embedding and the
    output layers."""
    names = [n for n, _ in unet.named_parameters()]
    if which == "x":
        out = [n for n in names if ".attn2." in n]
    elif which == "u":
        out = [n for n in names if ".attn2." not in n and not n.startswith(EXCLUDED_U)]
    else:
        raise ValueError(f"ESD trains 'x' (cross-attention) or 'u' (the rest), got {which!r}")
    if not out:
        raise ValueError(f"this UNet has no parameters for ESD-{which}")
    return out


class EsdSystem(DenseDeltaSystem):
    """A trainable copy of the UNet (``student``) against the frozen one; only the selected weights train."""

    def __init__(self, components, which: str, eta: float, optimizer):
        super().__init__(components, "unet", esd_parameter_names(components.unet, which), optimizer)
        self.eta = eta

    def training_step(self, batch, batch_idx):
        x_t = self.noise_scheduler.add_noise(batch["x0"], batch["noise"], batch["t"])  # (B, c, h, w)
        emb, t = batch["emb"], batch["t"]
        B = x_t.shape[0]
        with torch.no_grad():  # frozen ε(x_t, c), ε(x_t, ∅)
            eps_c, eps_u = self._unet(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                      torch.cat([emb, self.uncond.expand(B, -1, -1)])).split([B, B])
        pred = unet_eps(self.student, x_t, t, emb)
        loss = erase_loss(pred, eps_c, eps_u, self.eta)
        self.log("train/loss_erase", loss, on_step=True, on_epoch=False, batch_size=B)
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=B)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=B)
        return loss


class EsdMethod(DenseDeltaMethod):
    def __init__(self, which: str) -> None:
        self.which = which

    def build(self, components, cfg, datamodule):
        return EsdSystem(components, self.which, cfg.loss.eta, optimizer_factory(cfg.optim)), []

    def stats(self):
        return {"trained_weights": self.which}


@register("method", "esd_x")
def esd_x() -> EsdMethod:
    return EsdMethod("x")


@register("method", "esd_u")
def esd_u() -> EsdMethod:
    return EsdMethod("u")
