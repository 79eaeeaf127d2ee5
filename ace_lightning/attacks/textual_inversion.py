"""Textual inversion against an erased model (Pham et al. 2023, "Circumventing concept erasure methods"): learn new
token embeddings from images of the concept *through the erased model*, then prompt with them in place of the
concept's name. Needs no access to the base model at attack time: the images come from a folder, or (the default
here) from the base model's own generations, made before the attack."""

from __future__ import annotations

from pathlib import Path

import torch

from ace_lightning.attacks import AttackContext, Candidate, concept_spans, noisy_latents, row_generator
from ace_lightning.method.attack import insert_placeholders, optimise_soft_tokens, phrase_init
from ace_lightning.method.text import encode_ids, soft_tokens, tokenize
from ace_lightning.registry import register


def folder_latents(pipe, folder: str | Path) -> torch.Tensor:
    """(N, c, h, w): the VAE latents of every PNG/JPG in ``folder``, resized to the model's resolution."""
    import numpy as np
    from PIL import Image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise FileNotFoundError(f"textual_inversion: no .png/.jpg images in {folder}")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    imgs = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((size, size)), dtype=np.float32).copy())
            for f in files]
    x = torch.stack(imgs).permute(0, 3, 1, 2).div(127.5).sub(1).to(pipe.vae.device, pipe.vae.dtype)  # (N, 3, H, W)
    with torch.no_grad():
        return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


@register("attack", "textual_inversion")
class TextualInversionAttack:
    """``n_tokens`` embeddings per concept, learned for ``steps`` Adam steps at ``lr`` on ``n_images`` images of it
    (``images``: a folder; default: the base model's generations of ``template`` with seeds 10000..), with the
    standard loss ``||ε'(x_t, c) − ε||²`` of the prompt ``template`` holding the new tokens; then each erased
    prompt is attacked with its concept phrase replaced by them. One learning per (variant, concept, restart),
    reused by every row. Defaults for SD scale: 1 token, 500 steps at 5e-3 on 8 images."""

    def __init__(self, n_tokens: int = 1, steps: int = 500, lr: float = 5e-3, n_images: int = 8, restarts: int = 1,
                 template: str = "a picture of a {}", images: str | None = None, batch_size: int = 4) -> None:
        if n_tokens < 1 or steps < 1 or restarts < 1 or n_images < 1:
            raise ValueError("textual_inversion needs n_tokens, steps, n_images and restarts >= 1")
        if "{}" not in template:
            raise ValueError(f"textual_inversion template needs a {{}} slot, got {template!r}")
        self.n_tokens, self.steps, self.lr, self.n_images, self.restarts = n_tokens, steps, lr, n_images, restarts
        self.template, self.images, self.batch_size = template, images, batch_size
        self._learned: dict[tuple, torch.Tensor] = {}

    def _images(self, ctx: AttackContext, label: str) -> torch.Tensor:
        if self.images:
            return folder_latents(ctx.pipe, self.images).to(ctx.unet.device)
        from types import SimpleNamespace

        fake = [SimpleNamespace(prompt=self.template.format(label), seed=10_000 + k) for k in range(self.n_images)]
        return ctx.base_latents(fake)

    def learn(self, ctx: AttackContext, label: str, restart: int) -> torch.Tensor:
        """(n_tokens, d) embeddings of ``label`` for ``ctx.variant``, learned once and cached."""
        key = (ctx.variant, label, restart)
        if key in self._learned:
            return self._learned[key]
        from types import SimpleNamespace

        tok, te, unet = ctx.tokenizer, ctx.text_encoder, ctx.unet
        x0 = self._images(ctx, label)  # (N, c, h, w)
        rows = [SimpleNamespace(label=label, prompt=self.template.format(label), index=k, seed=restart)
                for k in range(x0.shape[0])]
        ids = tokenize(tok, [r.prompt for r in rows]).to(unet.device)
        span = concept_spans(tok, ids, rows, ctx.phrases)
        ids_adv, pos = insert_placeholders(ids, span, self.n_tokens, "replace", tok.eos_token_id)
        init = phrase_init(te, ids[:1], span[:1], self.n_tokens)[0]  # (n, d): from the concept's own tokens
        if restart:
            g = row_generator(ctx.seed, "ti-init", label, restart)
            init = init + 0.5 * float(te.get_input_embeddings().weight.std()) * torch.randn(init.shape, generator=g)
        # one embedding shared by a mini-batch of the images each step (cycling through them)
        steps = noisy_latents(ctx, rows, x0, self.steps, restart, f"ti-{label}")
        B = min(self.batch_size, len(rows))
        picks = [torch.arange(s * B, s * B + B) % len(rows) for s in range(self.steps)]
        _, _, emb = optimise_soft_tokens(
            unet, te, ids_adv[:B].to(unet.device), pos[:B], init[None], self.steps, self.lr,
            lambda s: (steps[s][0][picks[s]], steps[s][1][picks[s]], steps[s][2][picks[s]]), return_tokens=True)
        self._learned[key] = emb[0]  # (n, d)
        return self._learned[key]

    def __call__(self, ctx: AttackContext, rows) -> list[list[Candidate]]:
        tok, te = ctx.tokenizer, ctx.text_encoder
        ids = tokenize(tok, [r.prompt for r in rows]).to(ctx.unet.device)
        span = concept_spans(tok, ids, rows, ctx.phrases)
        ids_adv, pos = insert_placeholders(ids, span, self.n_tokens, "replace", tok.eos_token_id)
        out: list[list[Candidate]] = [[] for _ in rows]
        for restart in range(self.restarts):
            emb = torch.stack([self.learn(ctx, r.label, restart) for r in rows])  # (B, n, d)
            with torch.no_grad(), soft_tokens(te, pos, emb):
                c = encode_ids(te, ids_adv.to(ctx.unet.device))
            for i, r in enumerate(rows):
                phrase = tok.decode(ids[i, int(span[i, 0]):int(span[i, 1])])
                out[i].append(Candidate(r.prompt.replace(phrase, f"<{r.label}*>", 1), c[i]))
        return out
