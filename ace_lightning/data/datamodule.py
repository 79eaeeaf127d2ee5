"""The adversarial prompt-augmentation DataModule (spec §5-6).

At ``setup`` it builds, per concept, augmented erase prompts (templates x {concept, synonyms, mined
neighbours}) paired with neutral prompts, encodes them once with the frozen text encoder (the adapter
acts on the encoder's *outputs*, so these never change), pairs target-token positions by the token
policy, and generates (or loads from the disk cache) frozen-model latents ``x_0``. Each sample is
deterministic in (seed, index): concept, prompt, latent, timestep and noise.
Soft-prompt adversarial embeddings are produced during training by the system (``method/attack.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ace_lightning.data.prompts import (
    ErasureRequest,
    candidate_words,
    erase_prompts,
    family,
    known_words,
    mine_neighbours,
    preserve_prompts,
    vocabulary_prompts,
    words_of,
)
from ace_lightning.method.text import (
    encode_prompts,
    find_span,
    last_word_states,
    paired_positions,
    phrase_ids,
    token_mask,
)
from ace_lightning.models.sampling import SamplerSettings, generate
from ace_lightning.registry import ConfigError, build
from ace_lightning.utils import say


@dataclass
class ConceptData:
    request: ErasureRequest
    prompts: list[str]  # augmented erase prompts
    phrases: list[str]  # the phrase used in each prompt
    neutral_prompts: list[str]
    neighbours: list[tuple[str, dict]]  # mined neighbour words with their scores {"cos", "z"}
    emb: torch.Tensor  # (n, T, d) encoder outputs of the erase prompts
    emb_neu: torch.Tensor  # (n, T, d) of the neutral prompts
    target_mask: torch.Tensor  # (n, T) bool: the policy's target tokens
    C: torch.Tensor  # (d, n_tok) target-token embeddings (columns)
    N: torch.Tensor  # (d, n_tok) matching neutral-token embeddings
    latents: torch.Tensor  # (L, c, h, w) frozen-model x_0 for the concept's prompts
    ids: torch.Tensor  # (n, T) token ids of the erase prompts (for the soft-prompt attack)
    span: torch.Tensor  # (n, 2) [start, end) of the phrase in each erase prompt


def pad_sample(nonpad: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """bool (B, T): ``k`` random padding positions per row (fewer where a row has fewer pads). Random, not evenly
    spread: every position must be covered across rows, because a text encoder's pads carry position features
    (measured on ToyWorld: pads at positions 7-8, never sampled by an even spread from short prompts, dominated
    the gate directions of a concept whose erase prompts end there)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(nonpad.shape, generator=g).masked_fill(nonpad, 2.0)  # (B, T): pads get uniform keys, others 2
    kth = r.sort(dim=1).values[:, min(k, nonpad.shape[1]) - 1 : min(k, nonpad.shape[1])]  # (B, 1)
    return (r <= kth) & ~nonpad


def prompt_seed(seed: int, prompt: str) -> int:
    """A latent's seed from the run seed and the prompt itself (not its position in a list), so runs whose
    preserve sets overlap share the cached latents of the prompts they have in common."""
    return int(hashlib.sha256(f"{seed}/{prompt}".encode()).hexdigest()[:8], 16)


class LatentCache:
    """Frozen-model latents on disk, one file per (model fingerprint, prompt, seed, sampler settings).
    The fingerprint must cover every weight (``content_fingerprint``), so a changed model never reuses them."""

    def __init__(self, root: Path, fingerprint: str, settings: SamplerSettings):
        self.root, self.fingerprint, self.settings = Path(root) / "latents", fingerprint, settings

    def path(self, prompt: str, seed: int) -> Path:
        key = json.dumps([self.fingerprint, prompt, int(seed), self.settings.as_dict()], sort_keys=True)
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"

    def get(self, pipe, prompts: list[str], seeds: list[int], batch_size: int = 16) -> torch.Tensor:
        from ace_lightning.utils import atomic_save

        paths = [self.path(p, s) for p, s in zip(prompts, seeds)]
        todo = [i for i, p in enumerate(paths) if not p.exists()]
        if todo:
            say(f"generating {len(todo)} frozen-model latents (cached in {self.root})")
            lat = generate(pipe, [prompts[i] for i in todo], [seeds[i] for i in todo], self.settings.steps,
                           self.settings.guidance, output_type="latent", batch_size=batch_size, eta=self.settings.eta)
            for i, x in zip(todo, lat):
                atomic_save(paths[i], lambda tmp, x=x: torch.save(x.clone(), tmp))
        return torch.stack([torch.load(p, weights_only=True) for p in paths])  # (B, c, h, w)


class ErasureDataset(Dataset):
    """Deterministic random sampling: item ``i`` depends only on (seed, offset + i)."""

    def __init__(self, dm: ErasureDataModule, length: int, offset: int = 0):
        self.dm, self.length, self.offset = dm, length, offset

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        dm = self.dm
        g = torch.Generator().manual_seed(dm.seed * 1_000_003 + self.offset + i)
        k = int(torch.randint(len(dm.concepts), (1,), generator=g))
        cd = dm.concepts[k]
        j = int(torch.randint(len(cd.prompts), (1,), generator=g))
        lj = int(torch.randint(len(cd.latents), (1,), generator=g))
        pj = int(torch.randint(len(dm.preserve_latents), (1,), generator=g))
        t = dm.timesteps(2, generator=g, num_train_timesteps=dm.num_train_timesteps)  # (2,)
        x0, x0_p = cd.latents[lj], dm.preserve_latents[pj]
        return {
            "concept": k,
            "ids": cd.ids[j], "span": cd.span[j],
            "emb": cd.emb[j], "emb_neu": cd.emb_neu[j], "target_mask": cd.target_mask[j],
            "x0": x0, "t": t[0], "noise": torch.randn(x0.shape, generator=g),
            "emb_p": dm.preserve_emb[pj], "preserve_mask": dm.preserve_mask[pj],
            "x0_p": x0_p, "t_p": t[1], "noise_p": torch.randn(x0_p.shape, generator=g),
        }


class ErasureDataModule(L.LightningDataModule):
    def __init__(self, components, requests: list[ErasureRequest], cfg, sampler: SamplerSettings, seed: int,
                 max_steps: int, fingerprint: str):
        super().__init__()
        self.components, self.requests, self.cfg = components, requests, cfg
        self.sampler, self.seed, self.max_steps, self.fingerprint = sampler, seed, max_steps, fingerprint
        self.timesteps = build("timesteps", cfg.timesteps)
        self.num_train_timesteps = components.scheduler.config.num_train_timesteps
        self.concepts: list[ConceptData] = []
        self._ready = False

    # -- setup -------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        c, cfg = self.components, self.cfg
        cache = Path(cfg.cache_dir)
        tok = c.tokenizer
        # 1. mined neighbours first: they are erased too, so the vocabulary preserve set must not contain them
        general = family(cfg.template_family, [], self.seed).preserve_pool
        exclude = known_words(self.requests, c.source) | words_of(general)
        self.neighbours = [
            mine_neighbours(c.text_encoder, tok, req, cfg.neighbours_k, cfg.neighbours_vocab, exclude, cache,
                            min_z=cfg.neighbours_min_z, model_key=self.fingerprint) for req in self.requests]
        erased = [p for r in self.requests for p in r.phrases] + [w for nb in self.neighbours for w, _ in nb]
        # 2. what the model knows: whole words of its own vocabulary (frequent first), minus the erased ones
        self.vocab = candidate_words(tok, cfg.vocab_preserve, words_of(erased))
        # the gate's false-fire rate is measured on words of it in held-out three-word contexts (removing words
        # from the preserve set instead would un-preserve them: measured to cost 'triangle' on ToyWorld)
        rng = random.Random(f"{self.seed}/heldout-words")
        self.vocab_heldout = rng.sample(self.vocab, min(cfg.vocab_heldout, len(self.vocab)))
        self.fam = family(cfg.template_family, self.vocab, self.seed)
        self.preserve_prompts = preserve_prompts(self.requests, self.fam, cfg.preserve_prompts, self.seed, erased)
        if not self.preserve_prompts:
            raise ValueError("no preserve prompts left after removing those that mention an erased concept")
        self.preserve_emb, ids = encode_prompts(c.text_encoder, tok, self.preserve_prompts)  # (m, T, d)
        nonpad = token_mask(ids, tok.eos_token_id)  # (m, T)
        # vocabulary words in neutral and modifier contexts, encoded by the model's own text encoder: token-level
        # preserve equations for the closed form and negatives for the gate (no latents needed)
        t0 = time.perf_counter()
        if self.vocab:
            v_emb, v_ids = encode_prompts(c.text_encoder, tok, vocabulary_prompts(self.vocab, self.seed))  # (n, T, d)
            v_nonpad = token_mask(v_ids, tok.eos_token_id)  # (n, T)
            self.P_vocab = v_emb[v_nonpad].T.contiguous()  # (d, n_v)
            # the gate also sees 8 random padding positions of every vocabulary prompt: pads carry the prompt's
            # words through the causal encoder (measured: without them the gate fired on the pads of "a square"
            # after erasing "circle")
            v_gate = v_nonpad | pad_sample(v_nonpad, 8, self.seed)
            self.P_vocab_gate = v_emb[v_gate].T.contiguous()  # (d, n_vg)
        else:
            self.P_vocab = self.P_vocab_gate = torch.zeros(self.preserve_emb.shape[-1], 0)
        self.P = torch.cat([self.preserve_emb[nonpad].T, self.P_vocab], 1).contiguous()  # (d, tokens): spec's P
        # the gate must stay shut on every token the UNet attends to, padding included (padding EOS tokens
        # carry the prompt's content through the causal encoder): measured to fire on all pads otherwise
        masks = {"nonpad": nonpad, "all": torch.ones_like(nonpad)}
        if cfg.gate_preserve_tokens not in masks:
            raise ConfigError(f"data.gate_preserve_tokens must be one of {sorted(masks)}, got {cfg.gate_preserve_tokens!r}")
        self.preserve_mask = masks[cfg.gate_preserve_tokens]
        self.P_gate = torch.cat([self.preserve_emb[self.preserve_mask].T, self.P_vocab_gate], 1).contiguous()  # (d, tok.)
        say(f"preservation: {len(self.vocab)} vocabulary words and {len(self.preserve_prompts)} preserve prompts "
            f"encoded, {self.P.shape[1]} tokens ({time.perf_counter() - t0:.1f} s)")

        latents = LatentCache(cache, self.fingerprint, self.sampler)
        pipe = c.pipeline()
        self.sampler.apply(pipe)
        from ace_lightning.method.adapter import bank_of

        bank = bank_of(c.unet)
        ctx = bank.disabled() if bank is not None else contextlib.nullcontext()
        with ctx:
            npres = min(cfg.latents_preserve, len(self.preserve_prompts))
            self.preserve_latents = latents.get(
                pipe, self.preserve_prompts[:npres], [prompt_seed(self.seed, p) for p in self.preserve_prompts[:npres]]
            )
            self.preserve_emb, self.preserve_mask = self.preserve_emb[:npres], self.preserve_mask[:npres]
            for req, nb in zip(self.requests, self.neighbours):
                self.concepts.append(self._concept(req, nb, latents, pipe))
        self._ready = True

    def _concept(self, req: ErasureRequest, nb: list, latents: LatentCache, pipe) -> ConceptData:
        c, cfg = self.components, self.cfg
        triples = erase_prompts(req, req.phrases + [w for w, _ in nb], self.fam, cfg.prompts_per_concept, self.seed)
        prompts, phrases, neutrals = map(list, zip(*triples))
        emb, ids = encode_prompts(c.text_encoder, c.tokenizer, prompts)  # (n, T, d), (n, T)
        span = torch.tensor([find_span(r, phrase_ids(c.tokenizer, ph)) for r, ph in zip(ids.tolist(), phrases)])
        emb_neu, _ = encode_prompts(c.text_encoder, c.tokenizer, neutrals)
        mask = torch.zeros(emb.shape[:2], dtype=torch.bool)
        cols_c, cols_n = [], []
        for i, (p, ph, npr) in enumerate(triples):
            pc, pn = paired_positions(c.tokenizer, p, ph, npr, req.neutral, cfg.token_policy)
            mask[i, pc] = True
            cols_c.append(emb[i, pc])
            cols_n.append(emb_neu[i, pn])
        canon = [i for i, ph in enumerate(phrases) if ph == req.concept] or list(range(len(prompts)))
        lat_prompts = [prompts[canon[i % len(canon)]] for i in range(cfg.latents_per_concept)]
        x0 = latents.get(pipe, lat_prompts, [self.seed * 104729 + i for i in range(len(lat_prompts))])
        return ConceptData(req, prompts, phrases, neutrals, nb, emb, emb_neu, mask,
                           torch.cat(cols_c).T.contiguous(), torch.cat(cols_n).T.contiguous(), x0, ids, span)

    @torch.no_grad()
    def heldout_gate_rates(self, bank, threshold: float = 0.5) -> dict[str, float]:
        """Per concept: how often its gate fires (> ``threshold``) on vocabulary words in held-out three-word
        contexts (``gate/false_fire/<concept>``: other words it must leave alone), and on the concept's own last
        token after held-out modifiers (``gate/target_fire/<concept>``)."""
        from ace_lightning.method.adapter import slug

        c, words = self.components, self.vocab_heldout
        if not words:
            return {}
        rng = random.Random(f"{self.seed}/heldout")
        out = {}

        def last_word_tokens(prompts):
            return last_word_states(c.text_encoder, c.tokenizer, prompts)  # (n, d)

        others = last_word_tokens([f"a {rng.choice(words)} {rng.choice(words)} {w}" for w in words])
        for cd in self.concepts:
            ad = bank[cd.request.concept]
            mine = last_word_tokens([f"a {rng.choice(words)} {rng.choice(words)} {cd.request.concept}"
                                     for _ in range(min(64, len(words)))])
            dev = ad.A.device
            out[f"gate/false_fire/{slug(cd.request.concept)}"] = float((ad.gate(others.to(dev)) > threshold).float().mean())
            out[f"gate/target_fire/{slug(cd.request.concept)}"] = float((ad.gate(mine.to(dev)) > threshold).float().mean())
        return out

    def prompt_report(self) -> dict:
        """What exactly is erased, per concept: the augmented prompts with their phrase and neutral prompt,
        the synonyms, and the mined neighbours with their scores (written to the run folder as prompts.json)."""
        return {
            "template_family": self.cfg.template_family,
            "vocab_preserve": len(self.vocab), "preserve_vocab_tokens": int(self.P_vocab.shape[1]),
            "neighbours_min_z": self.cfg.neighbours_min_z,
            "concepts": [{
                "concept": cd.request.concept, "kind": cd.request.kind, "neutral": cd.request.neutral,
                "synonyms": list(cd.request.synonyms),
                "neighbours": [{"word": w, **sc} for w, sc in cd.neighbours],
                "prompts": [{"prompt": p, "phrase": ph, "neutral_prompt": n}
                            for p, ph, n in zip(cd.prompts, cd.phrases, cd.neutral_prompts)],
            } for cd in self.concepts],
            "preserve_prompts": list(self.preserve_prompts),
        }

    # -- loaders -----------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        done = self.trainer.global_step if self.trainer is not None else 0  # resume continues the stream
        n = max(1, self.max_steps - done) * self.cfg.batch_size
        ds = ErasureDataset(self, n, offset=done * self.cfg.batch_size)
        return DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=False, num_workers=self.cfg.num_workers)
