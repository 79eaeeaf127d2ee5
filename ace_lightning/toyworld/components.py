"""Architectures of the ToyWorld models (sizes chosen to train in under an hour on 2 CPU cores)."""
from __future__ import annotations

IMAGE_SIZE = 32  # px
CONTEXT_LENGTH = 24  # tokens, for both the diffusion text encoder and the toy CLIP
TEXT_WIDTH = 128  # hidden size of the diffusion text encoder = UNet cross-attention dim

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),  # 3 blocks -> 2 downsamplings -> 32 px / 4 = 8x8 latents
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=IMAGE_SIZE,
)

TEXT_CONFIG = dict(
    vocab_size=49408,  # the real CLIP BPE vocabulary
    hidden_size=TEXT_WIDTH,
    intermediate_size=4 * TEXT_WIDTH,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=CONTEXT_LENGTH,
    projection_dim=TEXT_WIDTH,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE // 4,  # latent side; * vae_scale_factor (4) = 32 px
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128),
    layers_per_block=1,
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=8,
    norm_num_groups=32,
)

# DDIM with every non-default choice explicit: latents are not clipped (clip_sample=False) and the
# final step uses alpha=1, as Stable Diffusion's scheduler config does
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)

# the toy open_clip model, registered with open_clip under this name at run time
CLIP_MODEL_NAME = "ToyWorld-CLIP"
CLIP_CONFIG = {
    "embed_dim": 64,
    # a ModifiedResNet tower (layers given as a list): convolutions learn shapes from scratch far faster
    # than a ViT on 32 px images (a 2-layer ViT reached only 0.59 zero-shot shape accuracy in 800 steps)
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": [1, 1, 1, 1], "width": 16, "head_width": 64},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def write_clip_config(path) -> None:
    """Write the toy CLIP's open_clip model config JSON (the file stem is the model name)."""
    import json

    with open(path, "w") as f:
        json.dump(CLIP_CONFIG, f, indent=2)


def register_toy_clip(config_path) -> str:
    """Register the toy CLIP config file with open_clip's model registry (idempotent); returns the name."""
    import open_clip

    if CLIP_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(config_path)
    return CLIP_MODEL_NAME
