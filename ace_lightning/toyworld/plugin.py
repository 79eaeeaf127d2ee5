"""What ToyWorld provides to the rest of the package, through the registry (nothing below imports toyworld)."""

from __future__ import annotations

from pathlib import Path

from ace_lightning.registry import register


def is_toyworld(source: str | None) -> bool:
    """Whether ``source`` (a model directory) is the embedded ToyWorld pipeline."""
    from ace_lightning.toyworld import PIPELINE_DIR

    return source is not None and Path(source).resolve() == PIPELINE_DIR.resolve()


@register("model_alias", "toyworld-cast")
def toyworld_cast() -> Path:
    """ToyWorld with its whole cast of 154 names (docs/SCALE.md): the shipped model plus the cast's token rows."""
    from ace_lightning.toyworld.cast_variant import cast_pipeline_dir

    return cast_pipeline_dir()


@register("world_vocabulary", "toyworld")
def toyworld_vocabulary(source: str | None) -> list[str]:
    """Every phrase ToyWorld's captions use for a concept (shapes, colours, styles, characters, neutrals and
    all synonyms) when ``source`` is ToyWorld; nothing for another model."""
    if not is_toyworld(source):
        return []
    from ace_lightning.toyworld.world import CHARACTERS, COLORS, NEUTRALS, SHAPES, STYLES

    out = [*NEUTRALS.values(), *COLORS, *CHARACTERS]
    for table in (SHAPES, STYLES):
        for name, syns in table.items():
            out += [name, *syns]
    return out


TOY_TEMPLATES: dict[str, list[str]] = {
    "object": ["a {}", "a {color} {}", "a {style} {}", "a {color} {style} {}", "a picture of a {color} {}",
               "a drawing of a {style} {}", "an image of a {color} {style} {}", "a photo of a {}"],
    "style": ["a {} {shape}", "a {color} {} {shape}", "a picture of a {} {shape}", "a drawing of a {color} {} {shape}",
              "an image of a {} {shape}", "a {} shape", "a picture of a {color} {} object"],
    "person": ["{}", "a picture of {}", "a drawing of {}", "an image of {}", "a photo of {}"],
    "nsfw": ["a {} {shape}"],
}


@register("template_family", "toyworld")
def toyworld_family(vocab: list[str], seed: int = 0):
    """The phrasing ToyWorld was trained on, with its colour / style / shape slots and a preserve pool naming its
    whole vocabulary. An option (``data.template_family=toyworld``): it knows the world, so numbers obtained with
    it are about the recipe, not the method; the default for every model is the generic ``sd`` family."""
    from ace_lightning.data.prompts import TemplateFamily
    from ace_lightning.toyworld.world import CHARACTERS, COLORS, SHAPES, STYLES

    nouns = [*SHAPES, "shape", "object"]
    pool = [f"a {c} {st} {sh}" for sh in nouns for c in COLORS for st in STYLES]
    pool += [f"a {st} {sh}" for sh in nouns for st in STYLES]  # short prompts: their padding differs
    pool += [f"a {sh}" for sh in SHAPES] + [f"a {st} shape" for st in STYLES] + [f"a picture of {c}" for c in CHARACTERS]
    fields = {"color": list(COLORS), "style": [s for s in STYLES if s != "plain"], "shape": list(SHAPES)}
    return TemplateFamily(TOY_TEMPLATES, fields, pool)
