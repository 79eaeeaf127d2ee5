"""Sampling with a stock diffusers pipeline: one generator per row, so results do not depend on batching."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ace_lightning.models.conditioning import pipeline_text_kwargs
from ace_lightning.registry import lookup, register


@register("sampler", "ddim")
def _ddim(config):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config, clip_sample=False)


@register("sampler", "pndm")
def _pndm(config):
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config(config)


@register("sampler", "euler")
def _euler(config):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(config)


@register("sampler", "dpmpp")
def _dpmpp(config):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(config)


@dataclass
class SamplerSettings:
    scheduler: str = "ddim"  # registered sampler name
    steps: int = 25  # denoising steps
    guidance: float = 5.0  # classifier-free guidance scale
    eta: float = 0.0  # DDIM eta (0 = deterministic)

    def apply(self, pipe):
        pipe.scheduler = lookup("sampler", self.scheduler)(pipe.scheduler.config)
        return pipe

    def as_dict(self) -> dict:
        return asdict(self)


def generate(
    pipe,
    prompts: list[str],
    seeds: list[int],
    steps: int = SamplerSettings.steps,  # defaults: the one set in SamplerSettings
    guidance: float = SamplerSettings.guidance,
    output_type: str = "pt",
    batch_size: int = 16,
    progress: bool = True,
    eta: float = SamplerSettings.eta,
    embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] (``output_type="pt"``) or latents (B, 4, h, w) (``"latent"``). ``embeds``
    (B, T, d): text-encoder outputs (SDXL: packed, see ``models.conditioning``) used instead of encoding
    ``prompts`` (which then only name the rows)."""
    if embeds is not None and len(embeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(embeds)} embeddings")
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if output_type not in ("pt", "latent"):
        raise ValueError(f"output_type must be 'pt' or 'latent', got {output_type!r}")
    dev = pipe.unet.device
    gen_dev = "cpu" if dev.type == "mps" else dev
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
        ps, ss = prompts[i : i + batch_size], seeds[i : i + batch_size]
        gens = [torch.Generator(gen_dev).manual_seed(int(s)) for s in ss]
        text = {"prompt": ps} if embeds is None else {
            k: v.to(dev, pipe.unet.dtype) for k, v in pipeline_text_kwargs(pipe.unet, embeds[i : i + batch_size]).items()}
        res = pipe(
            **text, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type=output_type, eta=eta
        ).images
        out.append(res.float().cpu())
    return torch.cat(out)


def training_noise_scheduler(scheduler):
    """The *training* noise schedule of a model: a ``DDPMScheduler`` from its scheduler config, whatever sampler
    the model ships with. A sigma-based sampler's ``add_noise`` (Euler: ``x0 + σ ε``, σ = 14.6 at t = 999)
    would feed the UNet inputs it was never trained on. ``prediction_type`` (epsilon / v_prediction) is kept:
    every loss compares the model's own predictions, so they stay in its parameterisation."""
    from diffusers import DDPMScheduler

    cfg = dict(scheduler.config)
    keep = {k: cfg[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                                "prediction_type", "rescale_betas_zero_snr") if k in cfg}
    return DDPMScheduler(**keep)
