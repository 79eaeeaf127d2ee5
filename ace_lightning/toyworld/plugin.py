"""What ToyWorld provides to the rest of the package, through the registry (nothing below imports toyworld)."""

from __future__ import annotations

from pathlib import Path

from ace_lightning.registry import register


def is_toyworld(source: str | None) -> bool:
    """Whether ``source`` (a model directory) is the embedded ToyWorld pipeline."""
    from ace_lightning.toyworld import PIPELINE_DIR

    return source is not None and Path(source).resolve() == PIPELINE_DIR.resolve()


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
