"""Stage 1 as a Lightning setup callback: closed-form init of every concept's gated adapter
(``method/initialize.py``), once the data module has its tokens."""

from __future__ import annotations

import lightning as L

from ace_lightning.method.initialize import initialize_bank


class ClosedFormInit(L.Callback):
    """Runs once in ``setup`` (after the DataModule's): solves stage 1 and calibrates the gates."""

    def __init__(self, closed_form_cfg, adapter_cfg):
        self.cf, self.acfg = closed_form_cfg, adapter_cfg
        self.stats: dict = {}

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        dm = trainer.datamodule
        dm.setup(stage)
        pl_module.set_gate_vocabulary(dm.P_vocab_gate.T)  # (n_v, d): gate negatives from the model's vocabulary
        if len(pl_module.bank.concepts):  # already initialised (a second fit, or a resumed module)
            self._extra_preserves(dm, pl_module)
            return
        from ace_lightning.method.adapter import base_weights

        weights = base_weights(pl_module.unet, self.acfg.targets)
        # what each gate was fitted on, kept only where the gates are refitted with adversarial positives (each
        # concept's negatives hold the whole preserve set: 10.6 GB at 10 concepts when they were always kept)
        fit_sets: dict | None = {} if pl_module.adv.gate_refit_steps else None
        self.stats = initialize_bank(pl_module.bank, weights, dm.concepts, dm.P, self.cf, self.acfg, dm.P_gate,
                                     dm.hard_negatives, fit_sets, dm.hard_positives, keep=dm.P_keep)
        if fit_sets is not None:
            pl_module.set_gate_fit_sets(fit_sets)
        from ace_lightning.utils import say

        what = "closed form" if self.cf.enabled else "LoRA-style init (closed form off)"
        say(f"{what}: {len(dm.concepts)} concept(s), {len(weights)} layers, {dm.P.shape[1]} preserve tokens, "
            f"{self.stats['_solve_seconds']:.2f} s for the edit, {self.stats['_seconds']:.1f} s with the gates "
            f"({self.stats['_gate_fit_seconds']:.1f} s their fits)")
        self._extra_preserves(dm, pl_module)
        pl_module.bank.to(pl_module.device)

    @staticmethod
    def _extra_preserves(dm, pl_module) -> None:
        """The fitted gates choose the extra preserve prompts of the fine-tuning (``data.preserve_pseudo``,
        ``data.preserve_hard_words``)."""
        if dm.extra_preserve is None:
            bank = pl_module.bank
            dm.add_extra_preserves(lambda name, X: bank[name].gate(X.to(bank[name].A)).cpu())
