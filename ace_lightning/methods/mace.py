"""MACE (Lu et al. 2024, "MACE: Mass Concept Erasure in Diffusion Models"), in three stages:

1. closed-form refinement (CFR) of every ``attn2`` key and value projection: the concept's tokens are mapped to
   what the projections give the neutral tokens, with the preserve tokens held (the shared closed form of
   ``method/closed_form.py``, at full rank and ungated, as UCE);
2. one LoRA per concept on the refined key projections, trained with MACE's attention loss: the attention of the
   concept's tokens inside the concept's region of the frozen model's own images of it (``method/attention_maps.py``;
   regions from ``mace.masks``, a ``mask_source``). The paper also puts LoRA on the value projections; its loss is a
   function of the attention maps alone, so those receive no gradient and are left out here;
3. closed-form fusion of the LoRAs into one key projection per layer (``method/fusion.py``).

The LoRAs of all concepts train in one loop, each batch row through its own concept's LoRA (independent parameters,
so this equals training them one after another). The adapter file holds the dense deltas of the key and value
projections.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from ace_lightning.method.adapter import layer_key
from ace_lightning.method.attention_maps import masked_attention_loss, record_cross_attention
from ace_lightning.method.closed_form import EditedWeights, preserve_factor, solve_concepts
from ace_lightning.method.fusion import fuse_projection
from ace_lightning.method.optim import optimizer_factory
from ace_lightning.methods.deltas import DenseDeltaMethod, DenseDeltaSystem
from ace_lightning.models.conditioning import unet_eps
from ace_lightning.registry import build, register
from ace_lightning.utils import say

FULL_RANK = 1_000_000  # the closed form's edit at its exact rank (as UCE)


def span_mask(span: torch.Tensor, T: int) -> torch.Tensor:
    """bool (B, T): True on the positions [start, end) of each row's ``span`` (B, 2)."""
    pos = torch.arange(T, device=span.device)[None]  # (1, T)
    return (pos >= span[:, :1]) & (pos < span[:, 1:2])


class MaceSystem(DenseDeltaSystem):
    """A float32 copy of the UNet whose ``attn2`` key/value weights carry the CFR edit, with per-concept LoRAs
    (A_k (r, d), B_k^l (o, r)) added to every key projection while training."""

    def __init__(self, components, mace_cfg, closed_form_cfg, targets, optimizer):
        unet = components.unet
        names = [n for n, _ in unet.named_parameters()
                 if ".attn2." in n and n.endswith(tuple(f".{t}.weight" for t in targets))]
        super().__init__(components, "unet", names, optimizer)
        self.mcfg, self.cf = mace_cfg, closed_form_cfg
        self.key_layers = {layer_key(n.removesuffix(".weight")): n.removesuffix(".weight")
                           for n in names if n.endswith(".to_k.weight")}
        self.lora_A = nn.ParameterDict()  # layer key -> (K, r, d)
        self.lora_B = nn.ParameterDict()  # layer key -> (K, o, r)
        self.masks: list[torch.Tensor] = []  # per concept (L, 1, H, W): the concept's region in each cached latent
        self.maps: list[torch.Tensor] = []
        self._rows: torch.Tensor | None = None  # concept index of each row in the current forward
        self._hooks: list = []
        self._processors: dict = {}  # the student's attention processors before recording, put back by fuse()
        self.stats: dict = {}
        self.fused = False

    # -- stage 1 and the LoRAs ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self._hooks or self.fused:
            return
        dm = self.trainer.datamodule
        t0 = time.perf_counter()
        params = dict(self.student.named_parameters())
        weights = {layer_key(n.removesuffix(".weight")): params[n].detach() for n in self.trained}
        factor = preserve_factor(dm.P, dm.P.shape[0], self.cf.lam, self.cf.s_p)
        solved = solve_concepts(EditedWeights.stack(weights), [(cd.C, cd.N) for cd in dm.concepts], factor,
                                self.cf.s_e, FULL_RANK)
        with torch.no_grad():
            for n in self.trained:
                k = layer_key(n.removesuffix(".weight"))
                params[n].add_(sum(r.B[k] @ r.A for r in solved).to(params[n]))  # W + Σ_k B_k A_k
        self.stats["closed_form_seconds"] = time.perf_counter() - t0
        K, r = len(dm.concepts), self.mcfg.rank
        g = torch.Generator().manual_seed(0)
        mods = dict(self.student.named_modules())
        for key, name in self.key_layers.items():
            lin = mods[name]
            self.lora_A[key] = nn.Parameter(torch.randn(K, r, lin.in_features, generator=g) / lin.in_features**0.5)
            self.lora_B[key] = nn.Parameter(torch.zeros(K, lin.out_features, r))
            self._hooks.append(lin.register_forward_hook(self._lora_hook(key)))
        self.lora_A.to(self.device)
        self.lora_B.to(self.device)
        self._processors = dict(self.student.attn_processors)
        self.maps = record_cross_attention(self.student)
        self.masks = self._concept_masks(dm)

    def _lora_hook(self, key: str):
        def hook(module, args, out):
            if self._rows is None:
                return out
            x = args[0]  # (B, T, d)
            z = torch.einsum("btd,brd->btr", x, self.lora_A[key][self._rows])  # (B, T, r)
            return out + torch.einsum("btr,bor->bto", z, self.lora_B[key][self._rows])  # (B, T, o)
        return hook

    @torch.no_grad()
    def _concept_masks(self, dm) -> list[torch.Tensor]:
        """The concept's region in each of its cached latents: decode them with the VAE, ask the mask source."""
        vae = self.components.vae.to(self.device)
        masks_of = build("mask_source", self.mcfg.masks)
        out = []
        for cd in dm.concepts:
            lat = cd.latents.to(self.device, vae.dtype) / vae.config.scaling_factor
            images = torch.cat([vae.decode(x).sample for x in lat.split(16)]).float().add(1).div(2).clamp(0, 1)
            m = masks_of(images)  # (L, 1, H, W)
            say(f"MACE: {cd.request.concept}: concept region {float(m.mean()):.0%} of the image on average")
            out.append(m.cpu())
        return out

    def configure_optimizers(self):
        return self.make_optimizer([*self.lora_A.values(), *self.lora_B.values()])

    # -- stage 2: the attention loss ------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x_t = self.noise_scheduler.add_noise(batch["x0"], batch["noise"], batch["t"])  # (B, c, h, w)
        emb, k = batch["emb"], batch["concept"]
        tokens = span_mask(batch["span"], batch["ids"].shape[1])  # (B, T): token rows (an SDXL emb has one more)
        mask = torch.stack([self.masks[int(c)][int(j)] for c, j in zip(k, batch["latent"])]).to(x_t)  # (B, 1, H, W)
        self.maps.clear()
        self._rows = k
        try:
            unet_eps(self.student, x_t, batch["t"], emb)
            loss = masked_attention_loss(self.maps, tokens, mask)
        finally:
            self._rows = None
            self.maps.clear()
        B = x_t.shape[0]
        self.log_dict({"train/loss": loss, "train/loss_attention": loss}, on_step=True, on_epoch=False, batch_size=B)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=B)
        return loss

    # -- stage 3: fusion, done once where the result is first needed (the grid's pipeline or the deltas) -------
    @torch.no_grad()
    def fuse(self) -> None:
        """Fuse the LoRAs into the key projections (once), then drop the hooks and the map recording."""
        if self.fused:
            return
        t0 = time.perf_counter()
        dm = self.trainer.datamodule
        mods = dict(self.student.named_modules())
        for key, name in self.key_layers.items():
            lin = mods[name]
            W = lin.weight.detach().float().cpu()  # (o, d), refined by CFR
            targets = []
            for i, cd in enumerate(dm.concepts):
                Wk = W + self.lora_B[key][i].detach().cpu() @ self.lora_A[key][i].detach().cpu()  # (o, d)
                targets.append((cd.C, Wk @ cd.C.float()))
            lin.weight.copy_(fuse_projection(W, targets, self.mcfg.lam, dm.P, self.mcfg.fuse_preserve).to(lin.weight))
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.student.set_attn_processor(self._processors)
        self.fused = True
        self.stats["fusion_seconds"] = time.perf_counter() - t0

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)  # keeps the student's key/value weights (the CFR edit)
        checkpoint["state_dict"].update({f"lora_{p}.{k}": v.detach().cpu() for p, d in (("A", self.lora_A), ("B", self.lora_B))
                                         for k, v in d.items()})

    @contextlib.contextmanager
    def pipeline(self, edited: bool = True):
        if edited:
            self.fuse()
        with super().pipeline(edited) as pipe:
            yield pipe

    def deltas(self) -> dict[str, torch.Tensor]:
        self.fuse()
        return super().deltas()


@register("method", "mace")
class MaceMethod(DenseDeltaMethod):
    def __init__(self) -> None:
        self.system: MaceSystem | None = None

    def build(self, components, cfg, datamodule):
        self.system = MaceSystem(components, cfg.mace, cfg.closed_form, cfg.adapter.targets, optimizer_factory(cfg.optim))
        return self.system, []

    def run_metrics(self, system, datamodule):
        return {"closed_form/seconds": float(system.stats.get("closed_form_seconds", 0.0))}

    def stats(self):
        return dict(self.system.stats) if self.system is not None else {}
