"""AdvUnlearn (Zhang et al. 2024, "Defensive Unlearning with Adversarial Training for Robust Concept Erasure"):
adversarial training of the *text encoder* (the UNet stays frozen). Every step alternates

1. attack: soft-prompt tokens (``adv.n_adv`` of them, at ``adv.position``) optimised for ``adv.steps`` Adam steps so
   that the current model reproduces the frozen model's prediction for the concept (the shared ``soft_prompt``
   attack, run against the text encoder being trained);
2. defense: ESD's loss on the attacked prompt, ε'(x_t, c_adv) → ε(x_t, ∅) − η (ε(x_t, c) − ε(x_t, ∅)), plus the
   utility-retention loss ``loss.alpha_pres · ||ε'(x_p, c'_p) − ε(x_p, c_p)||²`` on the preserve prompts, both
   through the trained text encoder.

Which layers train: ``advunlearn.layers`` (indices of ``text_model.encoder.layers``; [] = all of them). The
adapter file holds the dense deltas of those text-encoder weights.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ace_lightning.method.attack import insert_placeholders
from ace_lightning.method.losses import erase_loss
from ace_lightning.method.optim import optimizer_factory
from ace_lightning.method.text import encode_ids, soft_tokens
from ace_lightning.methods.deltas import DenseDeltaMethod, DenseDeltaSystem
from ace_lightning.registry import build, register


def text_layer_names(text_encoder: torch.nn.Module, layers: list[int]) -> list[str]:
    """Parameter names of the chosen transformer layers (``[]``: every layer) of every text encoder in
    ``text_encoder`` (SDXL's pair: layer i of each); an index must exist in every one of them."""
    found = {n: (m.group(1), int(m.group(2))) for n, _ in text_encoder.named_parameters()
             if (m := re.search(r"^(.*?)(?:^|\.)?encoder\.layers\.(\d+)\.", n))}
    if not found:
        raise ValueError("this text encoder has no encoder.layers.<i> parameters")
    depth: dict[str, int] = {}
    for enc, i in found.values():
        depth[enc] = max(depth.get(enc, 0), i + 1)
    bad = [i for i in layers if not all(0 <= i < d for d in depth.values())]
    if bad:
        have = ", ".join(f"0..{d - 1}" + (f" ({e.split('.')[0]})" if len(depth) > 1 else "") for e, d in depth.items())
        raise ValueError(f"advunlearn.layers {bad} out of range: this text encoder has layers {have}")
    return [n for n, (_, i) in found.items() if not layers or i in layers]


class AdvUnlearnSystem(DenseDeltaSystem):
    def __init__(self, components, layers: list[int], eta: float, alpha_retain: float, optimizer, adv_cfg):
        super().__init__(components, "text_encoder", text_layer_names(components.text_encoder, list(layers)), optimizer)
        self.eta, self.alpha_retain, self.adv = eta, alpha_retain, adv_cfg

    def training_step(self, batch, batch_idx):
        sch = self.noise_scheduler
        x_t = sch.add_noise(batch["x0"], batch["noise"], batch["t"])  # (B, c, h, w)
        x_p = sch.add_noise(batch["x0_p"], batch["noise_p"], batch["t_p"])
        t, emb = batch["t"], batch["emb"]
        B = x_t.shape[0]
        with torch.no_grad():  # frozen targets: ε(x_t, c), ε(x_t, ∅), ε(x_p, c_p)
            eps_c, eps_u, eps_p = self._unet(torch.cat([x_t, x_t, x_p]), torch.cat([t, t, batch["t_p"]]),
                                             torch.cat([emb, self.uncond.expand(B, -1, -1), batch["emb_p"]])
                                             ).split([B, B, x_p.shape[0]])
        # 1. attack the current text encoder
        ids, pos = insert_placeholders(batch["ids"], batch["span"], self.adv.n_adv, self.adv.position,
                                       self.components.tokenizer.eos_token_id)
        ids = ids.to(self.device)
        with torch.enable_grad():
            _, attack_loss, tokens = build("inner_attack", {"name": self.adv.name, "steps": self.adv.steps, "lr": self.adv.lr},
                                           unet=self.unet, text_encoder=self.student, ids=ids, positions=pos, x_t=x_t,
                                           t=t, eps_target=eps_c, init_ids=batch["ids"], init_span=batch["span"],
                                           return_tokens=True)
        self.student.zero_grad(set_to_none=True)  # the attack touched no weight grads; keep it that way
        # 2. defend: erase on the attacked prompt, retain the preserve prompts, through the trained text encoder
        with soft_tokens(self.student, pos, tokens):
            c_adv = encode_ids(self.student, ids)  # (B, T, d), grads to the trained layers
        l_erase = erase_loss(self._unet(x_t, t, c_adv), eps_c, eps_u, self.eta)
        c_p = encode_ids(self.student, batch["ids_p"])
        l_ret = F.mse_loss(self._unet(x_p, batch["t_p"], c_p), eps_p)
        loss = l_erase + self.alpha_retain * l_ret
        self.log_dict({"train/loss": loss, "train/loss_erase": l_erase, "train/loss_pres": l_ret,
                       "train/adv_attack_loss": torch.tensor(attack_loss)}, on_step=True, on_epoch=False, batch_size=B)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=B)
        return loss


@register("method", "advunlearn")
class AdvUnlearnMethod(DenseDeltaMethod):
    def build(self, components, cfg, datamodule):
        return AdvUnlearnSystem(components, list(cfg.advunlearn.layers), cfg.loss.eta, cfg.loss.alpha_pres,
                                optimizer_factory(cfg.optim), cfg.adv), []
