"""ESD (Gandikota et al. 2023, "Erasing Concepts from Diffusion Models"): fine-tune UNet weights so that

    ε'(x_t, c) → ε(x_t, ∅) − η (ε(x_t, c) − ε(x_t, ∅))        (frozen ε, negative guidance away from c)

``esd_x`` trains the cross-attention modules (every ``attn2`` weight), ``esd_u`` every other weight except the
time embedding and the output layers (the paper's "noxattn"). x_t: the frozen model's own samples of the concept
prompts (the shared latent cache), noised to a uniformly drawn t. The paper instead runs DDIM with the model being
edited down to t; both give samples of the concept at time t, this one without a sampling loop per step.
The adapter file holds the dense deltas of the trained weights only.
"""

from __future__ import annotations

import copy

import lightning as L
import torch

from ace_lightning.method.losses import erase_loss
from ace_lightning.registry import register
from ace_lightning.systems.erasure import training_noise_scheduler

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


class EsdSystem(L.LightningModule):
    """A trainable copy of the UNet (``student``) against the frozen one; only the selected weights train."""

    def __init__(self, components, which: str, eta: float, lr: float):
        super().__init__()
        object.__setattr__(self, "components", components)
        object.__setattr__(self, "frozen", components.unet)
        object.__setattr__(self, "text_encoder", components.text_encoder)
        self.noise_scheduler = training_noise_scheduler(components.scheduler)
        self.eta, self.lr = eta, lr
        self.student = copy.deepcopy(components.unet).float()
        self.trained = esd_parameter_names(self.student, which)
        keep = set(self.trained)
        for n, p in self.student.named_parameters():
            p.requires_grad_(n in keep)
        self.strict_loading = False  # checkpoints hold only the trained weights
        self.register_buffer("uncond", torch.zeros(0), persistent=False)
        self.student.train()  # (its dropout is whatever the model config says; ESD trains in train mode)

    def setup(self, stage: str) -> None:
        from ace_lightning.method.text import encode_prompts

        self.frozen.to(self.device).requires_grad_(False)
        self.text_encoder.to(self.device)
        emb, _ = encode_prompts(self.text_encoder, self.components.tokenizer, [""])  # (1, T, d): ε(x_t, ∅)
        self.uncond = emb.to(self.device)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.student.parameters() if p.requires_grad], lr=self.lr)

    def training_step(self, batch, batch_idx):
        x_t = self.noise_scheduler.add_noise(batch["x0"], batch["noise"], batch["t"])  # (B, c, h, w)
        emb, t = batch["emb"], batch["t"]
        B = x_t.shape[0]
        dt = self.frozen.dtype
        with torch.no_grad():
            frozen = self.frozen(torch.cat([x_t, x_t]).to(dt), torch.cat([t, t]),
                                 encoder_hidden_states=torch.cat([emb, self.uncond.expand(B, -1, -1)]).to(dt)).sample
        eps_c, eps_u = frozen.float().split([B, B])
        pred = self.student(x_t, t, encoder_hidden_states=emb).sample
        loss = erase_loss(pred, eps_c, eps_u, self.eta)
        self.log("train/loss_erase", loss, on_step=True, on_epoch=False, batch_size=B)
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=B)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=B)
        return loss

    def on_save_checkpoint(self, checkpoint):
        keep = {f"student.{n}" for n in self.trained}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    @torch.no_grad()
    def deltas(self) -> dict[str, torch.Tensor]:
        """``{"unet.<name>": W_trained − W_frozen}`` for the trained weights."""
        base = dict(self.frozen.named_parameters())
        student = dict(self.student.named_parameters())
        return {f"unet.{n}": student[n].float().cpu() - base[n].float().cpu() for n in self.trained}


class EsdMethod:
    def __init__(self, which: str) -> None:
        self.which = which

    def build(self, components, cfg, datamodule):
        return EsdSystem(components, self.which, cfg.loss.eta, cfg.optim.lr), []

    def save(self, path, system, requests, components, fingerprint, cfg, config_yaml):
        from ace_lightning.export import save_deltas

        save_deltas(path, system.deltas(), requests, components.source, fingerprint, cfg.adapter.targets, config_yaml,
                    unet=components.unet, method=cfg.method)

    def run_metrics(self, system, datamodule):
        return {}

    def stats(self):
        return {"trained_weights": self.which}


@register("method", "esd_x")
def esd_x() -> EsdMethod:
    return EsdMethod("x")


@register("method", "esd_u")
def esd_u() -> EsdMethod:
    return EsdMethod("u")
