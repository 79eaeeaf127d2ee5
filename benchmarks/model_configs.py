"""Architectures of real Stable Diffusion models, as public numbers (their ``config.json`` files), and a builder of
random-weight diffusers pipelines from them: what the full-size benchmarks time when no weights can be downloaded.

    SD-1.4  CompVis/stable-diffusion-v1-4          UNet 860 M parameters, CLIP ViT-L/14 text encoder (768-d)
    SDXL    stabilityai/stable-diffusion-xl-base-1.0  UNet 2.6 B, CLIP ViT-L/14 + OpenCLIP ViT-bigG/14 (768 + 1280)

``tiny`` variants keep every structural feature (block types, the text_time added embedding, two encoders) at
toy widths, so that the same code path runs on a CPU in seconds (used by the tests).
"""

from __future__ import annotations

from pathlib import Path

SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, sample_size=512,
)
CLIP_L = dict(  # openai/clip-vit-large-patch14 text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
CLIP_BIGG = dict(  # laion ViT-bigG-14 text tower (SDXL's text_encoder_2)
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)
BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

MODELS = {
    "sd14": dict(
        pipeline="StableDiffusionPipeline",
        unet=dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], norm_num_groups=32,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        ),
        text=[CLIP_L], vae=SD_VAE, vae_scaling=0.18215,
        scheduler=("PNDMScheduler", dict(**BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)),
    ),
    "sdxl": dict(
        pipeline="StableDiffusionXLPipeline",
        unet=dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
            attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], norm_num_groups=32,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        ),
        text=[CLIP_L, CLIP_BIGG], vae=dict(SD_VAE, sample_size=1024), vae_scaling=0.13025,
        scheduler=("EulerDiscreteScheduler", dict(**BETAS, steps_offset=1, timestep_spacing="leading")),
    ),
}
_TINY_TEXT = dict(vocab_size=49408, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
_TINY_VAE = dict(SD_VAE, block_out_channels=[8, 16, 16, 16], norm_num_groups=8, layers_per_block=1)
MODELS["sd14-tiny"] = dict(
    MODELS["sd14"], text=[dict(_TINY_TEXT, hidden_size=32)], vae=_TINY_VAE,
    unet=dict(MODELS["sd14"]["unet"], block_out_channels=[16, 16, 32, 32], cross_attention_dim=32, norm_num_groups=8,
              layers_per_block=1, attention_head_dim=4, sample_size=16),
)
MODELS["sdxl-tiny"] = dict(
    MODELS["sdxl"], text=[dict(_TINY_TEXT, hidden_size=32), dict(_TINY_TEXT, hidden_size=48, projection_dim=24)],
    vae=_TINY_VAE,
    unet=dict(MODELS["sdxl"]["unet"], block_out_channels=[16, 32, 32], cross_attention_dim=80, norm_num_groups=8,
              layers_per_block=1, attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 1, 2],
              addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8, sample_size=16),
)


def build_unet(name: str, dtype=None, device: str = "cpu"):
    """A random-weight UNet of model ``name`` (on ``device``, in ``dtype``)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**MODELS[name]["unet"])
    return unet.to(dtype) if dtype is not None else unet


def build_pipeline_dir(name: str, out: Path, dtype: str = "float32", seed: int = 0) -> Path:
    """Save a random-weight diffusers pipeline of model ``name`` at ``out`` (weights in ``dtype``) and return it.
    The tokenizers are the real CLIP BPE (rebuilt from open_clip's merges file; SDXL's second one pads with "!")."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ace_lightning.toyworld.tokenizer import write_clip_tokenizer

    spec = MODELS[name]
    torch.manual_seed(seed)
    tok_dir = write_clip_tokenizer(Path(out) / "_tok", model_max_length=77)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    sched_cls, sched_kw = spec["scheduler"]
    parts = dict(unet=build_unet(name), vae=diffusers.AutoencoderKL(**spec["vae"], scaling_factor=spec["vae_scaling"]),
                 scheduler=getattr(diffusers, sched_cls)(**sched_kw), tokenizer=tok)
    if len(spec["text"]) == 1:
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**spec["text"][0], **ids))
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**spec["text"][0], **ids))
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**spec["text"][1], **ids))
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(tok_dir, pad_token="!")
    pipe = getattr(diffusers, spec["pipeline"])(**parts)
    pipe.to(getattr(torch, dtype)).save_pretrained(out)
    return Path(out)
