"""What a run cost, for every method alike: wall seconds per stage, UNet and text-encoder passes (calls and
samples), backward passes, images generated for the run's own data, peak memory. Columns of ``make compare``."""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    values = x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else vars(x).values()
    return next((t for t in map(_first_tensor, values) if t is not None), None) if values else None


class _Counter:
    """Forward calls and samples; a forward whose output carries a graph counts as a backward pass too (every
    method here back-propagates through each graph it builds: training steps and inner attack steps alike)."""

    def __init__(self) -> None:
        self.calls, self.samples, self.grad_samples = 0, 0, 0

    def __call__(self, module, args, kwargs, output) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        n = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 1
        self.calls += 1
        self.samples += n
        out = _first_tensor(output)
        if torch.is_grad_enabled() and out is not None and out.requires_grad:
            self.grad_samples += n


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class CostMeter(L.Callback):
    """Counts forward passes of every UNet (the frozen one and any trained copy inside ``system``) and of the text
    encoder from construction on (so data preparation counts too), backward passes (one per optimiser step through
    the trained weights) and times the fine-tuning loop."""

    def __init__(self, components, system) -> None:
        self.unet, self.text = _Counter(), _Counter()
        self._handles = []
        # SDXL: count the first encoder, which the DualTextEncoder and the stock pipeline's own prompt encoding
        # (latent generation) both call once per sample
        text = getattr(components.text_encoder, "text_encoder", components.text_encoder)
        for base, counter in ((components.unet, self.unet), (text, self.text)):
            # the component and any trained copy of it inside the system (ESD's UNet, AdvUnlearn's text encoder)
            for m in {id(m): m for m in [base, *(m for m in system.modules() if type(m) is type(base))]}.values():
                self._handles.append(m.register_forward_hook(counter, with_kwargs=True))
        self.backward = 0
        self.fit_seconds = 0.0
        self._t0 = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_after_backward(self, trainer, pl_module) -> None:
        self.backward += 1

    def on_train_end(self, trainer, pl_module) -> None:
        if self._t0 is not None:
            self.fit_seconds = time.perf_counter() - self._t0
        for h in self._handles:
            h.remove()
        self._handles = []

    def summary(self, datamodule, closed_form_seconds: float = 0.0) -> dict[str, float]:
        cache = getattr(datamodule, "latent_cache", None)
        data_s = float(getattr(datamodule, "setup_seconds", 0.0))
        out = {
            "cost/data_seconds": data_s,  # mining, preserve encoding, latents (cached latents cost nothing)
            "cost/finetune_seconds": self.fit_seconds,
            "cost/closed_form_seconds": float(closed_form_seconds),
            "cost/adapt_seconds": data_s + self.fit_seconds + float(closed_form_seconds),
            "cost/unet_forward_calls": self.unet.calls, "cost/unet_forward_samples": self.unet.samples,
            "cost/unet_backward_samples": self.unet.grad_samples,  # inner attack steps included
            "cost/optimizer_steps": self.backward,
            "cost/text_encoder_forward_samples": self.text.samples,
            "cost/images_generated": cache.generated if cache is not None else 0,
            "cost/peak_rss_mib": peak_rss_mib(),
        }
        if torch.cuda.is_available():
            out["cost/peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return {k: float(v) for k, v in out.items()}
