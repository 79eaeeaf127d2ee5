"""Tiny random-weight stand-ins for the bench machinery's own tests (never downloads anything).

`tiny_pipeline_dir` writes a diffusers Stable Diffusion directory (16 px images) with the real CLIP BPE
tokenizer; `tiny_open_clip` writes an open_clip model config + checkpoint usable as
``scorer: {name: clip_zero_shot, model: <name>, model_config: <json>, pretrained: <file>}``.
Their numbers mean nothing; they exercise generation, sharding, resuming and metric reduction.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CLIP_NAME = "bench-tiny-clip"


def tiny_pipeline_dir(path: str | Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ace_lightning.toyworld.tokenizer import write_clip_tokenizer

    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))
    tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(path / "_tok", model_max_length=16)))
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return path


def tiny_open_clip(path: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """(config json, checkpoint) of a tiny random open_clip model named TINY_CLIP_NAME."""
    import open_clip

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg_path, ckpt = path / f"{TINY_CLIP_NAME}.json", path / "tiny_clip.pt"
    if not ckpt.is_file():
        cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 4, "head_width": 16},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
        cfg_path.write_text(json.dumps(cfg))
        if TINY_CLIP_NAME not in open_clip.list_models():
            open_clip.add_model_config(str(cfg_path))
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
        torch.save(model.state_dict(), ckpt)
    return cfg_path, ckpt
