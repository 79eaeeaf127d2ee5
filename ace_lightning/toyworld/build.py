"""Build ToyWorld end to end: `python -m ace_lightning.toyworld.build [--smoke] [--work-dir DIR]`.

Stages (each checkpointed under the work dir, so an interrupted build resumes where it stopped):
render data -> classifier -> toy CLIP -> VAE -> cache VAE latents -> text encoder + UNet (jointly, with
caption dropout for classifier-free guidance, EMA weights) -> export assets -> evaluate -> card.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import ASSETS_DIR, CARD_PATH, CLASSIFIER_DIR, CLIP_DIR, PIPELINE_DIR
from . import components as C
from .captions import describe, train_caption
from .world import CHARACTERS, COLORS, SHAPES, STYLES, random_look, render


@dataclass
class BuildConfig:
    seed: int = 0  # one seed for data, initialisation and caption sampling
    n_images: int = 24000  # rendered training images (12% of them are characters)
    p_character: float = 0.12  # share of character renders in the data
    classifier_steps: int = 600  # batch 128
    clip_steps: int = 600  # batch 128
    vae_steps: int = 800  # batch 64
    unet_steps: int = 2800  # batch 128, text encoder + UNet jointly
    unet_batch: int = 128
    unet_lr: float = 6e-4  # AdamW peak; warmup 100 steps then cosine to 10 %
    ema_decay: float = 0.999  # EMA of text encoder + UNet; the EMA weights are shipped
    caption_dropout: float = 0.1  # empty caption -> unconditional branch for CFG
    unet_max_minutes: float = 45.0  # wall-clock budget of the UNet stage: after 20 timed steps the step
    # count is lowered (never raised) to fit it, so the LR schedule still completes; recorded in the card
    ckpt_every: int = 200  # UNet checkpoint period (steps)
    threads: int = 1  # one thread: torch's 2-thread barriers stall badly on a shared 2-core machine
    cast_steps: int = 1200  # cast stage: Adam steps on the 150 new names' token embeddings (see cast_stage.py)
    cast_batch: int = 128
    cast_lr: float = 2e-3
    cast_images_per_character: int = 48


SMOKE = dict(n_images=600, classifier_steps=10, clip_steps=10, vae_steps=10, unet_steps=12, ckpt_every=5,
             cast_steps=3, cast_batch=8, cast_images_per_character=2)


def rgb_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def render_dataset(n: int, seed: int, p_character: float) -> dict:
    """n images with their looks; seeds are seed * 10^7 + i so train and eval renders never overlap."""
    rng = np.random.default_rng(seed)
    names = list(CHARACTERS)
    looks, chars = [], []
    for _ in range(n):
        if rng.random() < p_character:
            name = names[rng.integers(len(names))]
            looks.append(CHARACTERS[name])
            chars.append(names.index(name))
        else:
            looks.append(random_look(rng))
            chars.append(-1)
    images = np.stack([render(*look, seed=seed * 10_000_000 + i) for i, look in enumerate(tqdm(looks, desc="render"))])
    return {
        "images": images,  # (n, 32, 32, 3) uint8
        "shape": np.array([list(SHAPES).index(l[0]) for l in looks]),
        "color": np.array([list(COLORS).index(l[1]) for l in looks]),
        "style": np.array([list(STYLES).index(l[2]) for l in looks]),
        "character": np.array(chars),
    }


def look_of(data: dict, i: int) -> tuple[str, str, str, str | None]:
    c = int(data["character"][i])
    return (list(SHAPES)[data["shape"][i]], list(COLORS)[data["color"][i]], list(STYLES)[data["style"][i]],
            list(CHARACTERS)[c] if c >= 0 else None)


def cosine_lr(step: int, total: int, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


# ---------------------------------------------------------------------------------------------- stages
def train_classifier(data: dict, cfg: BuildConfig, gen: torch.Generator):
    from .classifier import ToyClassifier

    model = ToyClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    x_all = rgb_tensor(data["images"])
    y_all = {k: torch.from_numpy(data[k]).long() for k in ("shape", "color", "style")}
    blur = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=torch.float32) / 16
    blur = blur.view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    model.train()
    for step in (bar := tqdm(range(cfg.classifier_steps), desc="classifier")):
        for g in opt.param_groups:
            g["lr"] = 2e-3 * cosine_lr(step, cfg.classifier_steps, warmup=50, floor=0.02)
        idx = torch.randint(len(x_all), (128,), generator=gen)
        x = x_all[idx]
        # robustness to what a decoder draws: random blur and pixel noise
        soft = torch.rand(len(x), 1, 1, 1, generator=gen)
        x = soft * nn.functional.conv2d(x, blur, padding=1, groups=3) + (1 - soft) * x
        x = (x + 0.03 * torch.rand(len(x), 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        logits = model(x)
        loss = sum(nn.functional.cross_entropy(logits[k], y_all[k][idx]) for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def multi_positive_clip_loss(img_f: torch.Tensor, txt_f: torch.Tensor, scale: torch.Tensor,
                             caps: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE where every pair with the same caption counts as a positive.

    ToyWorld batches repeat captions ("a circle" many times); plain CLIP loss would push those apart.
    """
    same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)  # (B, B)
    target = same / same.sum(-1, keepdim=True)
    logits = scale * img_f @ txt_f.T  # (B, B)
    return 0.5 * (torch.sum(-target * logits.log_softmax(-1), -1).mean()
                  + torch.sum(-target * logits.T.log_softmax(-1), -1).mean())


def clip_caption(data: dict, i: int, rng: np.random.Generator) -> str:
    """Shape-first captions: the toy CLIP's metrics ask about shapes, and always see the shape word."""
    shape, color, style, char = look_of(data, i)
    if char is not None and rng.random() < 0.5:
        return f"a picture of {char}"
    if rng.random() < 0.4:
        return "a " + describe(shape, None, None, rng)
    return "a " + describe(shape, color if rng.random() < 0.7 else None, style if rng.random() < 0.6 else None, rng)


def train_clip(data: dict, cfg: BuildConfig, gen: torch.Generator, rng: np.random.Generator, work: Path):
    import open_clip

    from .clip import CONFIG_FILE, normalize

    C.write_clip_config(work / CONFIG_FILE)
    name = C.register_toy_clip(work / CONFIG_FILE)
    model = open_clip.create_model(name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-3, weight_decay=0.05)
    x_all = rgb_tensor(data["images"])
    model.train()
    for step in (bar := tqdm(range(cfg.clip_steps), desc="toy CLIP")):
        for g in opt.param_groups:
            g["lr"] = 1.5e-3 * cosine_lr(step, cfg.clip_steps, warmup=50, floor=0.02)
        idx = torch.randint(len(x_all), (128,), generator=gen)
        caps = [clip_caption(data, i, rng) for i in idx.tolist()]
        img_f, txt_f, scale = model(normalize(x_all[idx], model), tokenizer(caps))
        loss = multi_positive_clip_loss(img_f, txt_f, scale, caps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def train_vae(data: dict, cfg: BuildConfig, gen: torch.Generator):
    vae = C.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    x_all = rgb_tensor(data["images"]) * 2 - 1  # diffusers VAEs work in [-1, 1]
    vae.train()
    for step in (bar := tqdm(range(cfg.vae_steps), desc="VAE")):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * cosine_lr(step, cfg.vae_steps, warmup=50, floor=0.05)
        x = x_all[torch.randint(len(x_all), (64,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        mse = nn.functional.mse_loss(rec, x)
        loss = mse + 1e-6 * post.kl().mean()  # a whisper of KL keeps the latent scale bounded
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(mse01=f"{mse.item() / 4:.4f}")  # MSE in [0, 1] pixel units
    return vae.eval()


@torch.no_grad()
def encode_latents(vae, data: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Posterior mean and std of every training image, and the scaling factor (1 / latent std)."""
    x_all = rgb_tensor(data["images"]) * 2 - 1
    means, stds = [], []
    for i in tqdm(range(0, len(x_all), 256), desc="encode latents"):
        post = vae.encode(x_all[i : i + 256]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)  # (N, 4, 8, 8)
    sample_std = (mean.var() + (std**2).mean()).sqrt().item()
    return mean, std, 1.0 / sample_std


def noised(mean: torch.Tensor, std: torch.Tensor, idx: torch.Tensor, scale: float, alphas: torch.Tensor,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A diffusion training batch from cached VAE posteriors (mean, std: (N, 4, 8, 8)) at rows ``idx`` (B,):
    (z_t, t, noise), a latent sampled from each posterior, noised at a uniform timestep."""
    z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale  # (B, 4, 8, 8)
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.randint(0, len(alphas), (len(z0),), generator=gen)  # (B,)
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise, t, noise


def train_unet(data: dict, latents: tuple, cfg: BuildConfig, work: Path, rng_seed: int):
    """Text encoder + UNet, jointly, on cached latents; resumable from work/unet_ckpt.pt."""
    from transformers import CLIPTokenizer

    mean, std, scale = latents
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    text_encoder, unet, sched = C.make_text_encoder(), C.make_unet(), C.make_scheduler()
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(rng_seed)
    rng = np.random.default_rng(rng_seed)
    step, elapsed, ckpt = 0, 0.0, work / "unet_ckpt.pt"
    total = cfg.unet_steps  # may be lowered once to fit unet_max_minutes
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        text_encoder.load_state_dict(state["text_encoder"])
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        gen.set_state(state["gen"])
        rng.bit_generator.state = state["rng"]
        step, elapsed, total = state["step"], state["elapsed"], state["total"]
        print(f"resuming UNet training at step {step}")
    alphas = sched.alphas_cumprod  # (1000,)
    text_encoder.train()
    unet.train()
    bar = tqdm(total=total, initial=step, desc="text encoder + UNet")
    t_start = time.time() - elapsed
    stopped_early = False
    while step < total:
        minutes = (time.time() - t_start) / 60
        if step == 20 and total == cfg.unet_steps:  # fit the step count to the wall-clock budget
            total = min(total, int(cfg.unet_max_minutes / (minutes / 20)))
            bar.total = total
            print(f"\n{minutes / 20 * 60:.2f} s/step: training {total} steps to fit {cfg.unet_max_minutes} min")
        if minutes > 1.15 * cfg.unet_max_minutes:  # last resort if the machine slows down later
            stopped_early = True
            break
        for g in opt.param_groups:
            g["lr"] = cfg.unet_lr * cosine_lr(step, total)
        idx = torch.randint(len(mean), (cfg.unet_batch,), generator=gen)
        caps = [
            "" if rng.random() < cfg.caption_dropout else train_caption(*look_of(data, i), rng)
            for i in idx.tolist()
        ]
        ids = tokenizer(caps, padding="max_length", max_length=C.CONTEXT_LENGTH, truncation=True,
                        return_tensors="pt").input_ids  # (B, T)
        zt, t, noise = noised(mean, std, idx, scale, alphas, gen)
        cond = text_encoder(ids).last_hidden_state  # (B, T, 128)
        loss = nn.functional.mse_loss(unet(zt, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.ckpt_every == 0 or step == total:
            torch.save({"text_encoder": text_encoder.state_dict(), "unet": unet.state_dict(), "opt": opt.state_dict(),
                        "ema": ema, "gen": gen.get_state(), "rng": rng.bit_generator.state, "step": step, "total": total,
                        "elapsed": time.time() - t_start}, ckpt)
    bar.close()
    with torch.no_grad():  # ship the EMA weights
        for p, e in zip(params, ema):
            p.copy_(e)
    return text_encoder.eval(), unet.eval(), sched, {"steps_done": step, "steps_planned": total, "stopped_early": stopped_early,
                                                     "minutes": (time.time() - t_start) / 60}


# ---------------------------------------------------------------------------------------------- export
def _fp16_with_fp32_config(model, out: Path, transformers_model: bool) -> None:
    """Store weights in fp16 (half the bytes) but record float32 as the dtype to load them in."""
    model.to(torch.float16).save_pretrained(out)
    model.to(torch.float32)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if transformers_model:
        cfg["dtype"] = "float32"
        cfg.pop("torch_dtype", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))


def export_pipeline(vae, text_encoder, unet, sched, scale: float, work: Path, out: Path) -> None:
    vae.register_to_config(scaling_factor=scale)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _fp16_with_fp32_config(vae, out / "vae", transformers_model=False)
    _fp16_with_fp32_config(unet, out / "unet", transformers_model=False)
    _fp16_with_fp32_config(text_encoder, out / "text_encoder", transformers_model=True)
    shutil.copytree(work / "tokenizer", out / "tokenizer")
    sched.save_pretrained(out / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(sched).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def export_clip(model, out: Path) -> None:
    from safetensors.torch import save_file

    from .clip import CONFIG_FILE, WEIGHTS_FILE

    out.mkdir(parents=True, exist_ok=True)
    C.write_clip_config(out / CONFIG_FILE)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()},
              str(out / WEIGHTS_FILE))


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="toyworld_build", help="checkpoints and caches (resumable)")
    ap.add_argument("--out", default=str(ASSETS_DIR), help="where the assets and the card are written")
    ap.add_argument("--smoke", action="store_true", help="tiny step counts: checks the whole pipeline in a minute")
    ap.add_argument("--skip-eval", action="store_true", help="export only, no evaluation")
    ap.add_argument("--continue-from", default=None, metavar="ASSETS",
                    help="run only the cast stage on the model already built in ASSETS (e.g. the shipped one) and "
                         "write its token rows (cast/) and the card's cast section back there")
    ap.add_argument("--force", action="store_true", help="with --continue-from: even if ASSETS already has the cast")
    ap.add_argument("--no-cast", action="store_true",
                    help="skip the cast stage (the cast variant, model=toyworld-cast, of docs/SCALE.md)")
    for f, v in asdict(BuildConfig()).items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=None)
    args = ap.parse_args(argv)
    cfg = BuildConfig(**{**(SMOKE if args.smoke else {}),
                         **{k: v for k, v in vars(args).items() if k in asdict(BuildConfig()) and v is not None}})
    torch.set_num_threads(cfg.threads)
    work, out = Path(args.work_dir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    if args.continue_from:
        return continue_with_cast(Path(args.continue_from), cfg, work, args, argv)
    t0 = time.time()
    timings_path = work / "stage_seconds.json"  # kept across resumed runs
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def stage(name: str, path: Path, fn):
        """Run fn unless its result is already cached at path."""
        if path.is_file():
            print(f"[{name}] cached: {path}")
            return torch.load(path, weights_only=False)
        ts = time.time()
        result = fn()
        torch.save(result, path)
        timings[name] = round(time.time() - ts, 1)
        timings_path.write_text(json.dumps(timings, indent=2))
        return result

    torch.manual_seed(cfg.seed)
    data = stage("render", work / "data.pt", lambda: render_dataset(cfg.n_images, cfg.seed, cfg.p_character))
    from .tokenizer import write_clip_tokenizer

    write_clip_tokenizer(work / "tokenizer", C.CONTEXT_LENGTH)
    g = lambda k: torch.Generator().manual_seed(cfg.seed * 1000 + k)  # noqa: E731 - one stream per stage
    classifier = stage("classifier", work / "classifier.pt", lambda: train_classifier(data, cfg, g(1)))
    clip_model = stage("clip", work / "clip.pt",
                       lambda: train_clip(data, cfg, g(2), np.random.default_rng(cfg.seed + 2), work))
    vae = stage("vae", work / "vae.pt", lambda: train_vae(data, cfg, g(3)))
    latents = stage("latents", work / "latents.pt", lambda: encode_latents(vae, data))
    ts = time.time()
    unet_done = work / "unet_final.pt"
    if unet_done.is_file():
        text_encoder, unet, sched, unet_info = torch.load(unet_done, weights_only=False)
    else:
        text_encoder, unet, sched, unet_info = train_unet(data, latents, cfg, work, cfg.seed * 1000 + 4)
        torch.save((text_encoder, unet, sched, unet_info), unet_done)
        timings["text_encoder_unet"] = round(time.time() - ts, 1)
        timings_path.write_text(json.dumps(timings, indent=2))
    from .classifier import save_classifier

    out.mkdir(parents=True, exist_ok=True)
    pipeline_dir = out / PIPELINE_DIR.name
    export_pipeline(vae, text_encoder, unet, sched, latents[2], work, pipeline_dir)
    save_classifier(classifier.float(), out / CLASSIFIER_DIR.name)
    export_clip(clip_model, out / CLIP_DIR.name)
    cast_info = None
    if not args.no_cast:  # a variant, not the default model: the names' pieces are vocabulary words (SCALE.md)
        ts = time.time()
        cast_info = cast_stage(text_encoder, unet, sched, vae, latents[2], cfg, work)
        export_cast_rows(text_encoder, pipeline_dir, work, out)
        timings["cast"] = round(timings.get("cast", 0.0) + time.time() - ts, 1)  # summed over resumed runs
        timings_path.write_text(json.dumps(timings, indent=2))

    card = {
        "name": "ToyWorld",
        "image_size": C.IMAGE_SIZE,
        **({"cast": {"build": cast_info}} if cast_info else {}),
        "build": {**asdict(cfg), "smoke": args.smoke, "unet": unet_info, "stage_seconds": timings,
                  "vae_scaling_factor": latents[2], "torch": torch.__version__,
                  "diffusers": __import__("diffusers").__version__,
                  "transformers": __import__("transformers").__version__,
                  "command": " ".join(["python -m ace_lightning.toyworld.build", *(argv or sys.argv[1:])])},
        "architecture": {"vae": C.VAE_CONFIG, "text_encoder": C.TEXT_CONFIG, "unet": C.UNET_CONFIG,
                         "scheduler": C.SCHEDULER_CONFIG, "clip": C.CLIP_CONFIG},
    }
    card_path = out / CARD_PATH.name
    card_path.write_text(json.dumps(card, indent=2, default=list))
    if not args.skip_eval:
        from .evaluate import evaluate

        evaluate(out, n_per_figure=16 if args.smoke else 96)
    card = json.loads(card_path.read_text())
    card["build"]["this_run_minutes"] = round((time.time() - t0) / 60, 1)  # a resumed run counts only itself
    card["build"]["stages_minutes"] = round(sum(timings.values()) / 60, 1)  # every stage, across resumes
    card_path.write_text(json.dumps(card, indent=2))
    print(json.dumps(card.get("quality", {}), indent=2))
    return card


def cast_stage(text_encoder, unet, sched, vae, scale: float, cfg: BuildConfig, work: Path,
               tokenizer_dir: Path | None = None) -> dict:
    """The cast stage (see cast_stage.py) on a built model, in place; resumable through ``work``."""
    from transformers import CLIPTokenizer

    from .cast import base_pieces, cast
    from .cast_stage import CastConfig, train_cast

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir or work / "tokenizer")
    new = {k: v for k, v in cast().items() if k not in CHARACTERS}
    ccfg = CastConfig(steps=cfg.cast_steps, batch=cfg.cast_batch, lr=cfg.cast_lr,
                      images_per_character=cfg.cast_images_per_character, ckpt_every=cfg.ckpt_every, seed=cfg.seed)
    return train_cast(text_encoder, unet, tokenizer, sched, vae, scale, new, base_pieces(tokenizer), ccfg,
                      work / "cast", C.CONTEXT_LENGTH)


def export_cast_rows(text_encoder, pipeline_dir: Path, work: Path, out: Path) -> dict:
    """The cast-trained ``text_encoder`` saved as the shipped pipeline saves its own (float16), then only its rows
    that differ from ``pipeline_dir``'s text encoder written to ``out``/cast (:mod:`.cast_variant`)."""
    from .cast_variant import CAST_DIR, ROWS_FILE, save_cast_rows

    tmp = work / "cast_text_encoder"
    _fp16_with_fp32_config(text_encoder, tmp, transformers_model=True)
    return save_cast_rows(pipeline_dir / "text_encoder" / "model.safetensors", tmp / "model.safetensors",
                          out / CAST_DIR.name / ROWS_FILE)


def continue_with_cast(assets: Path, cfg: BuildConfig, work: Path, args, argv) -> dict:
    """``--continue-from``: the cast stage on the model in ``assets``; its token rows and the card's cast section
    are written there (the pipeline itself is not touched)."""
    from ace_lightning.models.loading import load_components

    from .cast_variant import CAST_DIR, ROWS_FILE

    t0 = time.time()
    card_path = assets / CARD_PATH.name
    card = json.loads(card_path.read_text())
    rows = assets / CAST_DIR.name / ROWS_FILE
    if rows.is_file() and not args.force:
        raise SystemExit(f"{assets} already has the cast ({rows}). Pass --force to train it again.")
    comp = load_components(assets / PIPELINE_DIR.name)
    info = cast_stage(comp.text_encoder, comp.unet, comp.scheduler, comp.vae, float(comp.vae.config.scaling_factor),
                      cfg, work, tokenizer_dir=assets / PIPELINE_DIR.name / "tokenizer")
    export_cast_rows(comp.text_encoder, assets / PIPELINE_DIR.name, work, assets)
    command = " ".join(["python -m ace_lightning.toyworld.build", *(argv or sys.argv[1:])])
    card["cast"] = {"build": {**info, "command": command, "minutes": round((time.time() - t0) / 60, 1)}}
    card_path.write_text(json.dumps(card, indent=2))
    if not args.skip_eval:
        from .evaluate import evaluate_cast

        evaluate_cast(assets, n_per_figure=16 if args.smoke else 96)
    return json.loads(card_path.read_text())


if __name__ == "__main__":
    main()
