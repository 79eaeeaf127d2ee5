"""The ACE training system (spec §5-6): frozen UNet + gated adapter bank; only adapter tensors train.

Frozen predictions come from the *same* UNet with adapters disabled (one UNet in memory).
The UNet and text encoder are deliberately not submodules: checkpoints hold only the adapter bank.
"""

from __future__ import annotations

import contextlib

import lightning as L
import torch

from ace_lightning.method.adapter import inject
from ace_lightning.method.attack import adversarial_gate_tokens, insert_placeholders
from ace_lightning.method.gate import fit_gate
from ace_lightning.method.losses import erase_loss, gate_loss, preserve_loss
from ace_lightning.models.conditioning import unet_eps
from ace_lightning.models.sampling import training_noise_scheduler
from ace_lightning.registry import build


class ErasureSystem(L.LightningModule):
    """``concepts``: the erased concepts in the data module's order (batch["concept"] indexes it); ``targets``: the
    projections the bank adapts; ``loss``: eta, alpha_pres, alpha_gate; ``adv``: the inner attack's settings;
    ``optimizer``: params -> optimizer (``method.optim.optimizer_factory``), whose lr the factors use and
    ``lr_gate`` the gates (0: gates keep their fitted values). The bank's adapters are added by the closed-form
    callback, which also hands over the vocabulary tokens the gate loss uses as negatives
    (``set_gate_vocabulary``)."""

    GATE_VOCAB_SAMPLE = 256  # vocabulary tokens added to the gate loss's negatives per step

    def __init__(self, components, concepts: list[str], targets: list[str], loss, adv, optimizer, lr_gate: float = 0.0):
        super().__init__()
        object.__setattr__(self, "components", components)
        object.__setattr__(self, "unet", components.unet)
        object.__setattr__(self, "text_encoder", components.text_encoder)
        self.noise_scheduler = training_noise_scheduler(components.scheduler)
        self.lcfg, self.adv = loss, adv
        self.make_optimizer, self.lr_gate = optimizer, float(lr_gate)
        self.bank = inject(components.unet, targets)
        self.concept_keys: list[str] = list(concepts)
        self.adv_pool: list[dict] = []
        self.vocab_tokens = torch.zeros(0, 0)
        self.gate_fit_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.adv_gate_pos: dict[str, torch.Tensor] = {}  # concept key -> (n, d) adversarial gate positives

    def set_gate_fit_sets(self, fit_sets: dict) -> None:
        """concept -> (positives (d, n), negatives (d, m)) each gate was fitted on (``initialize_bank``'s
        ``fit_sets``); with ``adv.gate_refit_steps`` the gates are refitted on them plus the adversarial tokens."""
        self.gate_fit_sets = dict(fit_sets)

    def set_gate_vocabulary(self, tokens: torch.Tensor) -> None:
        """(n_v, d) vocabulary tokens; each step samples ``GATE_VOCAB_SAMPLE`` of them as extra gate negatives."""
        self.vocab_tokens = tokens.contiguous()

    # -- plumbing ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.unet.to(self.device)
        self.text_encoder.to(self.device)

    def on_fit_start(self) -> None:
        self.unet.to(self.device)
        self.text_encoder.to(self.device)

    def configure_optimizers(self):
        gate_params = [p for ad in self.bank.concepts.values() for p in (ad.gamma, ad.tau) if p.requires_grad]
        lora_params = [p for ad in self.bank.concepts.values() for p in [ad.A, *ad.B.values()]]
        groups = [{"params": lora_params}]
        if gate_params:
            groups.append({"params": gate_params, "lr": self.lr_gate})
        return self.make_optimizer(groups)

    @contextlib.contextmanager
    def pipeline(self, edited: bool = True):
        """A stock pipeline over the frozen components; the adapter bank is on only when ``edited``."""
        with contextlib.nullcontext() if edited else self.bank.disabled():
            yield self.components.pipeline()

    def _unet(self, x, t, c):
        return unet_eps(self.unet, x, t, c)

    # -- the step ----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        sch = self.noise_scheduler
        x_t = sch.add_noise(batch["x0"], batch["noise"], batch["t"])  # (B, c, h, w)
        x_p = sch.add_noise(batch["x0_p"], batch["noise_p"], batch["t_p"])
        emb, emb_in, emb_neu, t = batch["emb"], batch["emb"], batch["emb_neu"], batch["t"]

        if self.adv.enabled and self.global_step >= self.adv.warmup:
            if self.global_step % self.adv.every == 0:
                self._attack(batch, x_t)
            if self.adv_pool:  # append adversarial rows: same x_t as the batch's first rows
                g = torch.Generator().manual_seed(self.global_step)
                picks = torch.randint(len(self.adv_pool), (min(self.adv.rows, len(self.adv_pool)),), generator=g)
                rows = [self.adv_pool[int(i)] for i in picks]
                m = len(rows)
                idx = torch.arange(m) % x_t.shape[0]
                emb_in = torch.cat([emb_in, torch.stack([r["c_adv"] for r in rows]).to(emb)])
                emb = torch.cat([emb, torch.stack([r["emb"] for r in rows]).to(emb)])
                emb_neu = torch.cat([emb_neu, torch.stack([r["emb_neu"] for r in rows]).to(emb)])
                x_t, t = torch.cat([x_t, x_t[idx]]), torch.cat([t, t[idx]])

        B, Bp = x_t.shape[0], x_p.shape[0]
        with torch.no_grad(), self.bank.disabled():  # frozen predictions: ε(x_t, c_tgt), ε(x_t, c_neu), ε(x_p, c_p)
            frozen = self._unet(torch.cat([x_t, x_t, x_p]), torch.cat([t, t, batch["t_p"]]),
                                torch.cat([emb, emb_neu, batch["emb_p"]]))
        eps_tgt, eps_neu, eps_p = frozen.split([B, B, Bp])
        pred = self._unet(torch.cat([x_t, x_p]), torch.cat([t, batch["t_p"]]), torch.cat([emb_in, batch["emb_p"]]))
        l_erase = erase_loss(pred[:B], eps_tgt, eps_neu, self.lcfg.eta)
        l_pres = preserve_loss(pred[B:], eps_p)

        # gate: each concept's gate on its own target tokens vs every preserve token
        pres_tok = batch["emb_p"][:, : batch["preserve_mask"].shape[1]][batch["preserve_mask"]]  # (m, d)
        if len(self.vocab_tokens):  # plus a fixed-size sample of vocabulary tokens (deterministic in the step)
            g = torch.Generator().manual_seed(10_007 + self.global_step)
            pick = torch.randint(len(self.vocab_tokens), (self.GATE_VOCAB_SAMPLE,), generator=g)
            pres_tok = torch.cat([pres_tok, self.vocab_tokens[pick].to(pres_tok)])
        l_gate, g_t_all, g_p_all = 0.0, [], []
        for k, name in enumerate(self.concept_keys):
            ad = self.bank[name]
            if not ad.gated:  # ungated ablation: the gate is 1 by construction, nothing to train
                continue
            rows = batch["concept"] == k
            tgt_tok = batch["emb"][rows][:, : batch["target_mask"].shape[1]][batch["target_mask"][rows]]  # (n, d)
            g_p = ad.gate(pres_tok)
            g_p_all.append(g_p)
            if tgt_tok.numel():
                g_t = ad.gate(tgt_tok)
                g_t_all.append(g_t)
                l_gate = l_gate + gate_loss(g_t, g_p)
        l_gate = l_gate / max(1, len(self.concept_keys))
        loss = l_erase + self.lcfg.alpha_pres * l_pres + self.lcfg.alpha_gate * l_gate

        log = {
            "train/loss": loss, "train/loss_erase": l_erase, "train/loss_pres": l_pres,
            "train/loss_gate": torch.as_tensor(l_gate, dtype=torch.float32),
            "train/gate_target": torch.cat(g_t_all).mean() if g_t_all else torch.tensor(float("nan")),
            "train/gate_preserve": torch.cat(g_p_all).mean() if g_p_all else torch.tensor(float("nan")),
        }
        self.log_dict(log, prog_bar=False, on_step=True, on_epoch=False, batch_size=B)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=B)
        return loss

    def _attack(self, batch, x_t):
        """Soft-prompt inner attack on the first ``adv.rows`` rows; results go to the adversarial pool."""
        n = min(self.adv.rows, x_t.shape[0])
        with torch.no_grad(), self.bank.disabled():
            target = self._unet(x_t[:n], batch["t"][:n], batch["emb"][:n])  # ε(x_t, c_tgt), frozen
        positions = str(self.adv.position).split(",")  # several: one per attack round, in turn
        position = positions[(self.global_step // self.adv.every) % len(positions)]
        ids, pos = insert_placeholders(batch["ids"][:n], batch["span"][:n], self.adv.n_adv, position,
                                       self.components.tokenizer.eos_token_id)
        with torch.enable_grad():
            c_adv, loss = build("inner_attack", {"name": self.adv.name, "steps": self.adv.steps, "lr": self.adv.lr},
                                unet=self.unet, text_encoder=self.text_encoder, ids=ids.to(self.device), positions=pos,
                                x_t=x_t[:n], t=batch["t"][:n], eps_target=target,
                                init_ids=batch["ids"][:n], init_span=batch["span"][:n])
        if self.adv.gate_refit_steps:
            self.refit_gates(adversarial_gate_tokens(c_adv, ids, pos, batch["ids"][:n], batch["span"][:n]),
                             batch["concept"][:n])
        for i in range(n):
            self.adv_pool.append({"c_adv": c_adv[i], "emb": batch["emb"][i], "emb_neu": batch["emb_neu"][i]})
        self.adv_pool = self.adv_pool[-self.adv.pool :]
        self.log("train/adv_attack_loss", loss, on_step=True, batch_size=n)

    @torch.no_grad()
    def refit_gates(self, tokens: torch.Tensor, concept: torch.Tensor) -> None:
        """Adversarial gate positives: ``tokens`` (n, k, d) of the attacked rows (``adversarial_gate_tokens``),
        ``concept`` (n,) their concept indices. Each concept's new tokens join its pool (the newest
        ``adv.gate_pool``) and its gate is refitted from where it is (``fit_gate``, ``adv.gate_refit_steps`` steps)
        on the positives and negatives it was first fitted on plus the pool as a positive term of its own. Without
        this the inner attack's rows teach nothing: the attack finds embeddings the gate stays shut on, so the
        edit, and its gradient, is zero on them. Under DDP every rank refits on every rank's tokens."""
        if self._trainer is not None and self.trainer.world_size > 1:
            tokens, concept = self.all_gather(tokens).flatten(0, 1), self.all_gather(concept).flatten(0, 1)
        for k, name in enumerate(self.concept_keys):
            new = tokens[concept.to(tokens.device) == k].flatten(0, 1).float().cpu()  # (n_k * k, d)
            ad = self.bank[name]
            if not len(new) or not ad.gated or name not in self.gate_fit_sets:
                continue
            pool = torch.cat([self.adv_gate_pos.get(name, new[:0]), new])[-self.adv.gate_pool :]
            self.adv_gate_pos[name] = pool
            pos, neg = self.gate_fit_sets[name]
            Q, gamma, tau = fit_gate(ad.Q.cpu(), float(ad.gamma), float(ad.tau), pos, neg, steps=self.adv.gate_refit_steps,
                                     seed=self.global_step, C_extra=pool.T, q_neg=ad.q_neg)
            ad.Q.copy_(Q)
            ad.gamma.fill_(gamma)
            ad.tau.fill_(tau)
        self.log("train/adv_gate_pool", float(sum(len(v) for v in self.adv_gate_pos.values())), on_step=True,
                 batch_size=len(concept))

    # -- checkpoints hold only the adapter -----------------------------------------------------------
    # everything a step depends on besides the adapter and optimizer (which Lightning saves): the adversarial
    # pool, so that N steps straight and k + resume (N - k) give the identical adapter
    def on_save_checkpoint(self, checkpoint):
        checkpoint["ace_concepts"] = list(self.concept_keys)
        checkpoint["ace_adv_pool"] = [{k: v.detach().cpu() for k, v in row.items()} for row in self.adv_pool]
        checkpoint["ace_adv_gate_pos"] = {k: v.cpu() for k, v in self.adv_gate_pos.items()}

    def on_load_checkpoint(self, checkpoint):
        saved = checkpoint.get("ace_concepts")
        if saved is not None and self.concept_keys and list(saved) != list(self.concept_keys):
            raise ValueError(f"checkpoint was trained for concepts {saved}, this run erases {self.concept_keys}")
        self.adv_pool = [{k: v.to(self.device) for k, v in row.items()} for row in checkpoint.get("ace_adv_pool", [])]
        self.adv_gate_pos = dict(checkpoint.get("ace_adv_gate_pos", {}))
