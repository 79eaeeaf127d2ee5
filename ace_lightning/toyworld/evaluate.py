"""Measure the shipped ToyWorld model and write `quality` into its card.

`python -m ace_lightning.toyworld.evaluate [--assets DIR] [--n 96]` generates from the shipped pipeline
with the default sampler settings, scores the images with the shipped classifier and fills in
shape/colour/style accuracy on attribute prompts, shape accuracy on synonym and held-out prompts,
character accuracy (all three attributes right), the classifier's and the toy CLIP's accuracy on renders,
and the generation speed. Where the assets hold the cast's token rows, the card's ``cast`` section measures the
cast variant (``model=toyworld-cast``) over the whole cast and the cast's looks described in words
(:func:`evaluate_cast`; ``--cast-only`` runs just that).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import ASSETS_DIR, CARD_PATH, CLASSIFIER_DIR, CLIP_DIR, PIPELINE_DIR
from .captions import attribute_prompts, character_prompts, heldout_prompts, synonym_prompts
from .cast_variant import CAST_DIR, ROWS_FILE
from .world import COLORS, SHAPES, STYLES, random_look, render

DEFAULT_SAMPLER = {"scheduler": "ddim", "steps": 25, "guidance": 5.0, "eta": 0.0}
EVAL_SEED = 10_000  # seeds of generated images are EVAL_SEED + row
RENDER_SEED = 900_000_000  # fresh renders, disjoint from the build's training seeds


def load_pipeline(path: str | Path | None = None):
    """The shipped pipeline (or one at ``path``) with the DDIM sampler."""
    from ace_lightning.models.loading import load_components
    from ace_lightning.models.sampling import SamplerSettings

    return SamplerSettings(scheduler="ddim").apply(load_components(path).pipeline())


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch_size: int = 32):
    """(B, 3, H, W) images in [0, 1] via the project's sampler (one generator per row)."""
    from ace_lightning.models.sampling import generate as sample

    return sample(pipe, prompts, seeds, steps, guidance, batch_size=batch_size, progress=False)


def renders(n: int, seed: int) -> tuple[torch.Tensor, list[tuple[str, str, str]]]:
    rng = np.random.default_rng(seed)
    looks = [random_look(rng) for _ in range(n)]
    imgs = np.stack([render(*look, seed=seed + i) for i, look in enumerate(looks)])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, looks


def _acc(pred: torch.Tensor, names: list[str], labels: list[str]) -> float:
    return float((pred == torch.tensor([labels.index(n) for n in names])).float().mean())


@torch.no_grad()
def clip_zero_shot_shape_acc(clip_dir: Path, images: torch.Tensor, shapes: list[str]) -> float:
    from .clip import load_toy_clip, normalize

    model, _, tokenizer = load_toy_clip(path=clip_dir)
    templates = ["a {}", "a picture of a {}", "a drawing of a {}"]
    text = []
    for sh in SHAPES:  # prompt ensemble: mean of normalised embeddings
        e = model.encode_text(tokenizer([t.format(sh) for t in templates]), normalize=True).mean(0)
        text.append(e / e.norm())
    img = model.encode_image(normalize(images, model), normalize=True)  # (N, D)
    pred = (img @ torch.stack(text).T).argmax(-1)
    return _acc(pred, shapes, list(SHAPES))


def look_acc(pipe, clf, prompts: list[str], looks: list[tuple[str, str, str]], seed: int, steps: int,
             guidance: float) -> torch.Tensor:
    """Per prompt, whether its image shows ``looks[i]`` (all three classifier heads right); (N,) bool."""
    p = clf.predict(generate(pipe, prompts, [seed + i for i in range(len(prompts))], steps, guidance))
    ok = torch.ones(len(prompts), dtype=torch.bool)
    for j, k in enumerate(("shape", "color", "style")):
        ok &= p[k] == torch.tensor([clf.labels[k].index(lk[j]) for lk in looks])
    return ok


def cast_quality(pipe, clf, per_character: int, steps: int, guidance: float) -> dict[str, float]:
    """``character_acc`` over the whole cast ("a picture of <name>", ``per_character`` seeds each), the worst
    character's, and ``described_look_acc``: the same looks asked for in words ("a <colour> <style> <shape>")."""
    from .cast import cast

    people = cast()
    names = [n for n in people for _ in range(per_character)]
    ok = look_acc(pipe, clf, [f"a picture of {n}" for n in names], [people[n] for n in names], EVAL_SEED, steps,
                  guidance)
    per = ok.view(len(people), per_character).float().mean(1)  # (n_characters,)
    said = look_acc(pipe, clf, [f"a {c} {st} {sh}" for n in names for sh, c, st in [people[n]]],
                    [people[n] for n in names], EVAL_SEED, steps, guidance)
    return {"character_acc": float(ok.float().mean()), "character_acc_worst": float(per.min()),
            "characters_below_0.5": float((per < 0.5).sum()), "described_look_acc": float(said.float().mean())}


def evaluate(assets: str | Path = ASSETS_DIR, n_per_figure: int = 96, sampler: dict | None = None) -> dict:
    from .classifier import load_classifier

    assets = Path(assets)
    sampler = {**DEFAULT_SAMPLER, **(sampler or {})}
    clf = load_classifier(assets / CLASSIFIER_DIR.name)
    L = clf.labels
    q: dict[str, float] = {}

    imgs, looks = renders(max(960, n_per_figure), RENDER_SEED)
    pred = clf.predict(imgs)
    q["classifier_acc"] = float(np.mean([
        _acc(pred[k], [lk[j] for lk in looks], L[k]) for j, k in enumerate(("shape", "color", "style"))
    ]))
    q["clip_zero_shot_shape_acc"] = clip_zero_shot_shape_acc(assets / CLIP_DIR.name, imgs[:384],
                                                             [lk[0] for lk in looks[:384]])

    pipe = load_pipeline(assets / PIPELINE_DIR.name)
    steps, cfg = sampler["steps"], sampler["guidance"]
    seeds = [EVAL_SEED + i for i in range(n_per_figure)]

    def score(prompts: list[str]) -> dict[str, torch.Tensor]:
        return clf.predict(generate(pipe, prompts, seeds[: len(prompts)], steps, cfg))

    attr = attribute_prompts(max(n_per_figure, len(SHAPES) * len(COLORS) * len(STYLES)))
    p = clf.predict(generate(pipe, [a for a, _ in attr], [EVAL_SEED + i for i in range(len(attr))], steps, cfg))
    for j, k in enumerate(("shape", "color", "style")):
        q[f"{k}_acc"] = _acc(p[k], [lk[j] for _, lk in attr], L[k])
    syn = synonym_prompts(n_per_figure)
    q["synonym_shape_acc"] = _acc(score([a for a, _ in syn])["shape"], [s for _, s in syn], L["shape"])
    held = heldout_prompts(n_per_figure)
    q["heldout_shape_acc"] = _acc(score([a for a, _ in held])["shape"], [s for _, s in held], L["shape"])
    card_path = assets / CARD_PATH.name
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    chars = character_prompts(n_per_figure)  # the original four: the base model knows no other name
    q["character_acc"] = float(look_acc(pipe, clf, [a for a, _ in chars], [lk for _, lk in chars], EVAL_SEED, steps,
                                        cfg).float().mean())

    # speed: 64 images at the default settings, in the default batch of 32
    t0 = time.time()
    generate(pipe, [a for a, _ in attr[:64]], list(range(64)), steps, cfg)
    q["images_per_second"] = round(64 / (time.time() - t0), 2)
    q = {k: round(v, 4) for k, v in q.items()}

    card["quality"] = {**q, "sampler": sampler, "images_per_figure": n_per_figure,
                       "threads": torch.get_num_threads()}
    card["targets"] = {"shape_acc": 0.95, "color_acc": 0.85, "style_acc": 0.85, "synonym_shape_acc": 0.90,
                       "heldout_shape_acc": 0.90, "character_acc": 0.75, "classifier_acc": 0.98,
                       "clip_zero_shot_shape_acc": 0.90}
    card_path.write_text(json.dumps(card, indent=2))
    if (assets / CAST_DIR.name / ROWS_FILE).is_file():
        evaluate_cast(assets, n_per_figure, sampler)
    return card["quality"]


CAST_TARGETS = {"character_acc": 0.90, "character_acc_first4": 0.75, "described_look_acc": 0.90}


def evaluate_cast(assets: str | Path = ASSETS_DIR, n_per_figure: int = 96, sampler: dict | None = None) -> dict:
    """The card's ``cast`` section: the cast variant (``model=toyworld-cast``, :mod:`.cast_variant`) over the whole
    cast (>= 4 images a character at ``n_per_figure`` >= 96), the original four, and the looks in words."""
    from .cast_variant import cast_pipeline_dir
    from .classifier import load_classifier

    assets = Path(assets)
    sampler = {**DEFAULT_SAMPLER, **(sampler or {})}
    clf = load_classifier(assets / CLASSIFIER_DIR.name)
    pipe = load_pipeline(cast_pipeline_dir(assets))
    steps, cfg = sampler["steps"], sampler["guidance"]
    chars = character_prompts(n_per_figure)
    q = {"character_acc_first4": float(look_acc(pipe, clf, [a for a, _ in chars], [lk for _, lk in chars], EVAL_SEED,
                                                steps, cfg).float().mean()),
         **cast_quality(pipe, clf, 4 if n_per_figure >= 96 else 1, steps, cfg)}
    card_path = assets / CARD_PATH.name
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    card["cast"] = {**card.get("cast", {}), "model": "toyworld-cast",
                    "quality": {**{k: round(v, 4) for k, v in q.items()}, "sampler": sampler,
                                "images_per_figure": n_per_figure},
                    "targets": CAST_TARGETS}
    card_path.write_text(json.dumps(card, indent=2))
    return card["cast"]["quality"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default=str(ASSETS_DIR), help="assets dir holding pipeline/, clip/, classifier/")
    ap.add_argument("--n", type=int, default=96, help="images per figure (>= 96 for the card)")
    ap.add_argument("--steps", type=int, default=DEFAULT_SAMPLER["steps"])
    ap.add_argument("--guidance", type=float, default=DEFAULT_SAMPLER["guidance"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cast-only", action="store_true", help="only the card's cast section (the cast variant)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sampler = {"steps": args.steps, "guidance": args.guidance}
    q = (evaluate_cast if args.cast_only else evaluate)(args.assets, args.n, sampler)
    print(json.dumps(q, indent=2))


if __name__ == "__main__":
    main()
