"""ACE (closed form + gated LoRA fine-tuning), its ablations, and UCE (the same closed form, full rank, no gate,
no fine-tuning): one system, different recipes in ``experiments/methods/``."""

from __future__ import annotations

from ace_lightning.registry import register


class AceMethod:
    """The ACE system (``systems/erasure.py``) with the closed-form setup callback."""

    def __init__(self) -> None:
        self.closed_form = None

    def build(self, components, cfg, datamodule):
        from ace_lightning.callbacks.closed_form import ClosedFormInit
        from ace_lightning.method.optim import optimizer_factory
        from ace_lightning.systems.erasure import ErasureSystem

        self.closed_form = ClosedFormInit(cfg.closed_form, cfg.adapter)
        system = ErasureSystem(components, [r.concept for r in datamodule.requests], cfg.adapter.targets, cfg.loss,
                               cfg.adv, optimizer_factory(cfg.optim), lr_gate=cfg.optim.lr_gate)
        return system, [self.closed_form]

    def save(self, path, system, requests, components, fingerprint, cfg, config_yaml):
        from ace_lightning.export import save_adapter

        save_adapter(path, system.bank, requests, components.source, fingerprint, cfg.adapter.targets, config_yaml,
                     unet=components.unet, method=cfg.method)

    def run_metrics(self, system, datamodule):
        out = datamodule.heldout_gate_rates(system.bank)
        out["closed_form/seconds"] = float(self.stats().get("_seconds", float("nan")))  # solve + gates
        out["closed_form/solve_seconds"] = float(self.stats().get("_solve_seconds", float("nan")))  # the edit only
        out["closed_form/gate_fit_seconds"] = float(self.stats().get("_gate_fit_seconds", float("nan")))  # all gates
        return out

    def stats(self):
        return dict(self.closed_form.stats) if self.closed_form is not None else {}


for _name in ("ace", "ace_ungated", "ace_no_closed_form", "ace_closed_form_only", "ace_no_adv", "ace_eta0", "ace_adv_gate",
              "ace_many", "ace_names", "ace_looks", "ace_siblings", "uce"):
    register("method", _name)(AceMethod)
