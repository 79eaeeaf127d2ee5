"""What ToyWorld provides to the benchmark (``bench/`` never imports toyworld): its class lists as
``class_source`` entries and its scorers (the shipped classifier and toy CLIP) as ``scorer`` entries."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ace_lightning.bench.scorers import (
    ClassInfo,
    ClipScore,
    ClipZeroShot,
    Scorer,
    ScorerWeightsError,
    _OpenClipBase,
    file_digest,
)
from ace_lightning.registry import ConfigError, register


# ---- class lists -----------------------------------------------------------------------------------
@register("class_source", "toyworld_shapes")
def _toy_shapes() -> dict[str, list[str]]:
    from ace_lightning.toyworld.world import SHAPES

    return {k: list(v) for k, v in SHAPES.items()}


@register("class_source", "toyworld_styles")
def _toy_styles() -> dict[str, list[str]]:
    from ace_lightning.toyworld.world import STYLES

    return {k: list(v) for k, v in STYLES.items()}


@register("class_source", "toyworld_characters")
def _toy_characters() -> dict[str, list[str]]:
    from ace_lightning.toyworld.world import CHARACTERS

    return {k: [] for k in CHARACTERS}


@register("class_source", "toyworld_character_looks")
def _toy_character_looks() -> dict[str, list[str]]:
    """Each character's look in words, "a <colour> <style> <shape>" (the canonical words the captions use)."""
    from ace_lightning.toyworld.world import CHARACTERS

    return _looks_in_words(CHARACTERS)


@register("class_source", "toyworld_cast")
def _toy_cast() -> dict[str, list[str]]:
    """The whole cast: the four characters and the 150 names of the build's cast stage (toyworld/cast.py)."""
    from ace_lightning.toyworld.cast import cast

    return {k: [] for k in cast()}


@register("class_source", "toyworld_cast_looks")
def _toy_cast_looks() -> dict[str, list[str]]:
    from ace_lightning.toyworld.cast import cast

    return _looks_in_words(cast())


def _looks_in_words(people: dict[str, tuple[str, str, str]]) -> dict[str, list[str]]:
    return {k: [f"a {color} {style} {shape}"] for k, (shape, color, style) in people.items()}


# ---- scorers ---------------------------------------------------------------------------------------
def _toy_clip():
    from ace_lightning.toyworld.clip import load_toy_clip

    try:
        model, preprocess, tokenizer = load_toy_clip(device="cpu")
    except FileNotFoundError as e:
        raise ScorerWeightsError(str(e)) from e
    from ace_lightning.toyworld import CLIP_DIR
    from ace_lightning.toyworld.clip import WEIGHTS_FILE

    return model, preprocess, tokenizer, {"model": "ToyWorld-CLIP", "pretrained": str(CLIP_DIR),
                                          "weights_sha256": file_digest(CLIP_DIR / WEIGHTS_FILE)}


@register("scorer", "toy_clip_zero_shot")
class ToyClipZeroShot(ClipZeroShot):
    """Zero-shot classification with the ToyWorld CLIP (shipped weights)."""

    def __init__(self, text_template: str = "a picture of a {}") -> None:
        net, pre, tok, info = _toy_clip()
        _OpenClipBase.__init__(self, net, pre, tok, dict(info, scorer="toy_clip_zero_shot"), text_template)


@register("scorer", "toy_clip_score")
class ToyClipScore(ClipScore):
    """CLIP score with the ToyWorld CLIP (shipped weights)."""

    def __init__(self) -> None:
        net, pre, tok, info = _toy_clip()
        _OpenClipBase.__init__(self, net, pre, tok, dict(info, scorer="toy_clip_score"), "{}")


@register("scorer", "toy_classifier")
class ToyClassifierScorer(Scorer):
    """The ToyWorld classifier. ``head`` is ``shape``, ``color`` or ``style`` (the suite's class names must be
    that head's labels), or ``look`` for characters: a character is predicted when all three heads agree
    with its (shape, colour, style); its probability is the product of the three head probabilities."""

    outputs = ("probs", "pred")

    def __init__(self, head: str = "shape", path: str | None = None) -> None:
        super().__init__()
        if head not in ("shape", "color", "style", "look"):
            raise ConfigError(f"toy_classifier head must be one of shape, color, style, look; got {head!r}")
        from ace_lightning.toyworld.classifier import load_classifier

        try:
            self.clf = load_classifier(path=path, device="cpu")
        except FileNotFoundError as e:
            raise ScorerWeightsError(f"ToyWorld classifier weights not found: {e}") from e
        if isinstance(self.clf, nn.Module):
            self.clf.eval().requires_grad_(False)
        self.head = head
        from ace_lightning.toyworld import CLASSIFIER_DIR
        from ace_lightning.toyworld.classifier import WEIGHTS_FILE

        wdir = Path(path or CLASSIFIER_DIR)
        self._info = {"scorer": "toy_classifier", "head": head, "weights": str(wdir),
                      "weights_sha256": file_digest(wdir / WEIGHTS_FILE)}

    def info(self) -> dict:
        return dict(self._info)

    def setup(self, classes: ClassInfo | None) -> None:
        if classes is None:
            raise ConfigError("toy_classifier needs a suite with classes")
        self.classes = classes
        labels = self.clf.labels
        if self.head == "look":
            from ace_lightning.toyworld.cast import cast

            people = cast()  # the four characters and the rest of the cast
            bad = [c for c in classes.names if c not in people]
            if bad:
                raise ConfigError(f"head=look scores ToyWorld characters; unknown: {bad}")
            self._look = [[labels[h].index(v) for h, v in zip(("shape", "color", "style"), people[c], strict=True)]
                          for c in classes.names]
        else:
            bad = [c for c in classes.names if c not in labels[self.head]]
            if bad:
                raise ConfigError(f"classes {bad} are not labels of the classifier's {self.head} head {labels[self.head]}")
            self._idx = [labels[self.head].index(c) for c in classes.names]

    def _head_probs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if hasattr(self.clf, "probs"):
            return self.clf.probs(images)
        out = self.clf(images) if isinstance(self.clf, nn.Module) else None
        if isinstance(out, dict):
            return {k: v.float().softmax(-1) for k, v in out.items()}
        pred = self.clf.predict(images)  # one-hot fallback: argmax only
        return {k: torch.nn.functional.one_hot(v, len(self.clf.labels[k])).float() for k, v in pred.items()}

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        hp = self._head_probs(images)
        if self.head != "look":
            p = hp[self.head]  # (B, K) over the head's labels
            head_pred = p.argmax(-1)
            probs = p[:, self._idx]  # (B, C) restricted to the suite's classes
            idx = torch.tensor(self._idx, device=p.device)
            match = head_pred[:, None] == idx[None]  # (B, C)
        else:
            heads = ("shape", "color", "style")
            probs = torch.stack([
                hp["shape"][:, s] * hp["color"][:, c] * hp["style"][:, st] for s, c, st in self._look
            ], dim=1)  # (B, C)
            preds = [hp[h].argmax(-1) for h in heads]
            look = torch.tensor(self._look, device=probs.device)  # (C, 3)
            match = torch.stack([(preds[i][:, None] == look[None, :, i]) for i in range(3)]).all(0)  # (B, C)
        pred = torch.where(match.any(-1), match.float().argmax(-1), torch.full_like(match[:, 0], -1, dtype=torch.long))
        return {"probs": probs, "pred": pred}
