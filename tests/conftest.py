"""Shared fixtures: tiny diffusers/transformers models built from config (never downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)


def build_tiny_model(path, seed: int = 0, max_len: int = 16, v2: bool = False):
    """A tiny SD-layout model (UNet with cross-attention, CLIP text encoder, VAE, DDIM) saved at ``path``.

    ``v2``: the SD-2.x differences — "!" padding, gelu text encoder, linear-projection transformers,
    v-prediction."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ace_lightning.toyworld.tokenizer import write_clip_tokenizer

    torch.manual_seed(seed)
    tok_dir = write_clip_tokenizer(path / "_tok", model_max_length=max_len)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, **({"pad_token": "!"} if v2 else {}))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=max_len, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            hidden_act="gelu" if v2 else "quick_gelu",
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, use_linear_projection=v2,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, sample_size=32,
    )
    sched = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        prediction_type="v_prediction" if v2 else "epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_sdxl(path, seed: int = 0, max_len: int = 16):
    """A tiny SDXL-layout model saved at ``path``: two CLIP text encoders (the second with a projection; its
    tokenizer pads with "!"), a UNet with the ``text_time`` added embedding whose cross-attention width is the
    two encoders' widths together, a VAE and an Euler sampler (SDXL's)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ace_lightning.toyworld.tokenizer import write_clip_tokenizer

    torch.manual_seed(seed)
    tok_dir = write_clip_tokenizer(path / "_tok", model_max_length=max_len)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir, pad_token="!")

    def text_config(width, layers):
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=max_len, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=24,
            hidden_act="gelu",
        )

    text_encoder = CLIPTextModel(text_config(32, 3))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(48, 4))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 48, attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, sample_size=32,
    )
    sched = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=sched)
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_v2_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_sd2"), seed=1, max_len=20, v2=True)


@pytest.fixture()
def tiny_components(tiny_model_dir):
    from ace_lightning.models.loading import load_components

    return load_components(str(tiny_model_dir))


@pytest.fixture(scope="session")
def toyworld_cache(tmp_path_factory):
    """One latent/neighbour cache for every ToyWorld training in the session (keyed by model fingerprint, prompt,
    seed and sampler): the 160 preserve latents are generated once, not once per test."""
    return tmp_path_factory.mktemp("toyworld_cache")
