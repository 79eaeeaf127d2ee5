"""ToyWorld: the small text-to-image latent diffusion model that ships with ace_lightning.

Light on purpose: importing this package only defines paths; the heavy parts live in submodules.
"""
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
PIPELINE_DIR = ASSETS_DIR / "pipeline"  # diffusers StableDiffusionPipeline layout
CLIP_DIR = ASSETS_DIR / "clip"  # toy open_clip model: config JSON + safetensors
CLASSIFIER_DIR = ASSETS_DIR / "classifier"  # shape / colour / style CNN: safetensors + labels
CARD_PATH = ASSETS_DIR / "toyworld_card.json"  # measured quality and the exact build settings

__all__ = ["ASSETS_DIR", "PIPELINE_DIR", "CLIP_DIR", "CLASSIFIER_DIR", "CARD_PATH", "require_files"]


def require_files(path: Path, files: tuple[str, ...], what: str) -> None:
    """FileNotFoundError naming every missing file of a ToyWorld component at ``path``."""
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{what} not found: {', '.join(str(path / f) for f in missing)} missing; build it with `make toyworld`"
        )
