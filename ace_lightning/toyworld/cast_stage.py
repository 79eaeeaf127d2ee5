"""The build's cast stage: teach a built ToyWorld model the 150 new names of :mod:`.cast`.

Only the token embeddings of the new names' BPE pieces train (textual inversion of names, with the shipped UNet
and text-encoder layers frozen), by the diffusion loss on renders of each character's look captioned with its name.
No piece of a new name occurs in the base build's captions (:func:`.cast.base_pieces`), so every prompt made of
the base build's words keeps its text embedding, and with it everything the model drew before, bit for bit: every
number measured on the base model still holds. (A piece such as ``il</w>`` may also end an English word that
ToyWorld never learned; such a prompt's embedding does change, and it meant nothing to the model before either.)

Resumable: the trained rows, the optimiser and the random streams are checkpointed under the work dir, each file
with what it was made for (names, looks, rows, settings, the frozen model's hashes); a mismatch is an error.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .captions import CHARACTER_TEMPLATES
from .world import render


@dataclass
class CastConfig:
    steps: int = 1200  # Adam steps on the new names' token embeddings
    batch: int = 128  # renders per step
    lr: float = 2e-3  # Adam peak; warmup 50 steps then cosine to 10 %
    images_per_character: int = 48  # pre-rendered (and VAE-encoded) renders per new character
    ckpt_every: int = 100  # checkpoint period (steps)
    seed: int = 0


def _same(saved: dict, now: dict, path: Path, keys: tuple[str, ...]) -> None:
    """RuntimeError unless the ``keys`` of a resumed file's identity match this run's."""
    bad = [k for k in keys if saved.get(k) != now[k]]
    if bad:
        raise RuntimeError(f"{path} was made for another cast stage ({', '.join(bad)} differ): use another "
                           "--work-dir or delete it")


def trainable_rows(tokenizer, names: list[str], frozen: set[str]) -> torch.Tensor:
    """The vocabulary ids of the names' BPE pieces, less the ``frozen`` pieces (sorted, (K,))."""
    pieces = {p for n in names for p in tokenizer.tokenize(n)} - frozen
    return torch.tensor(sorted(tokenizer.convert_tokens_to_ids(sorted(pieces))))


def render_cast(looks: dict[str, tuple[str, str, str]], per: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """``per`` renders of each look (seeds disjoint from the base build's and the evaluation's) and their name
    index: ((N, 32, 32, 3) uint8, N names)."""
    images, who = [], []
    for k, look in enumerate(tqdm(looks.values(), desc="render cast")):
        for j in range(per):
            images.append(render(*look, seed=700_000_000 + seed * 1_000_000 + k * 1000 + j))
            who.append(k)
    return np.stack(images), who


@torch.no_grad()
def encode(vae, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std of every render ((N, 4, 8, 8) each)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    means, stds = [], []
    for i in range(0, len(x), batch):
        post = vae.encode(x[i : i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def train_cast(text_encoder, unet, tokenizer, sched, vae, scale: float, looks: dict[str, tuple[str, str, str]],
               frozen: set[str], cfg: CastConfig, work: Path, context_length: int) -> dict:
    """Train the token-embedding rows of ``looks``' names in place (the rest of ``text_encoder`` and ``unet`` are
    untouched); returns what the card records."""
    from torch.func import functional_call

    from .build import cosine_lr, noised

    work.mkdir(parents=True, exist_ok=True)
    names = list(looks)
    rows = trainable_rows(tokenizer, names, frozen)  # (K,)
    emb = text_encoder.get_input_embeddings().weight  # (V, D)
    key = next(k for k, v in text_encoder.named_parameters() if v is emb)
    before = emb.detach().clone()
    # what a resumed run must share with the files it resumes from: the names, their looks, the trained rows, the
    # settings and the frozen model (a hash of the UNet's weights and of the embedding rows that do not train)
    from ace_lightning.models.loading import model_fingerprint

    frozen_rows = torch.ones(len(emb), dtype=torch.bool)
    frozen_rows[rows] = False
    identity = {"looks": looks, "rows": rows.tolist(), "config": asdict(cfg), "unet": model_fingerprint(unet),
                "frozen_rows": hashlib.sha256(emb.detach()[frozen_rows].float().numpy().tobytes()).hexdigest()[:16]}
    data_path = work / "cast_data.pt"
    if data_path.is_file():
        mean, std, who, made_for = torch.load(data_path, weights_only=False)
        _same(made_for, identity, data_path, ("looks", "unet"))
    else:
        images, who = render_cast(looks, cfg.images_per_character, cfg.seed)
        mean, std = encode(vae, images)
        torch.save((mean, std, who, identity), data_path)
    who = torch.tensor(who)
    table = emb.detach()[rows].clone().requires_grad_(True)  # (K, D): the only trained tensor
    opt = torch.optim.Adam([table], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    start, elapsed, ckpt = 0, 0.0, work / "cast_ckpt.pt"
    losses: list[float] = []
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        _same(state["identity"], identity, ckpt, tuple(identity))
        table.data.copy_(state["table"])
        losses = state["losses"]
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        rng.bit_generator.state = state["rng"]
        start, elapsed = state["step"], state["elapsed"]
        print(f"resuming the cast stage at step {start}")
    for p in (*text_encoder.parameters(), *unet.parameters()):
        p.requires_grad_(False)
    text_encoder.eval()
    unet.eval()
    alphas = sched.alphas_cumprod  # (1000,)
    t_start = time.time() - elapsed
    for step in (bar := tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="cast")):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * cosine_lr(step, cfg.steps, warmup=50)
        idx = torch.randint(len(mean), (cfg.batch,), generator=gen)  # (B,)
        caps = [str(rng.choice(CHARACTER_TEMPLATES)).format(names[int(who[i])]) for i in idx]
        ids = tokenizer(caps, padding="max_length", max_length=context_length, truncation=True,
                        return_tensors="pt").input_ids  # (B, T)
        zt, t, noise = noised(mean, std, idx, scale, alphas, gen)  # (B, 4, 8, 8), (B,), (B, 4, 8, 8)
        weight = emb.detach().index_put((rows,), table)  # (V, D): the frozen table with the trained rows
        cond = functional_call(text_encoder, {key: weight}, (ids,)).last_hidden_state  # (B, T, D)
        loss = nn.functional.mse_loss(unet(zt, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            torch.save({"table": table.detach(), "opt": opt.state_dict(), "gen": gen.get_state(),
                        "rng": rng.bit_generator.state, "step": step + 1, "elapsed": time.time() - t_start,
                        "losses": losses[-50:], "identity": identity}, ckpt)
    with torch.no_grad():
        emb[rows] = table.detach()
    changed = (emb != before).any(-1).nonzero().flatten()
    if not set(changed.tolist()) <= set(rows.tolist()):
        raise RuntimeError("the cast stage changed token embeddings outside the new names' pieces")
    return {"names": len(names), "trained_rows": len(rows), "steps": cfg.steps, "batch": cfg.batch, "lr": cfg.lr,
            "images_per_character": cfg.images_per_character, "final_loss_50": round(float(np.mean(losses[-50:])), 5)
            if losses else None, "minutes": round((time.time() - t_start) / 60, 2)}

