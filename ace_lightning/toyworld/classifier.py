"""The ToyWorld attribute classifier: a small CNN with one head each for shape, colour and style."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .world import COLORS, SHAPES, STYLES

WEIGHTS_FILE, LABELS_FILE = "classifier.safetensors", "labels.json"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class ToyClassifier(nn.Module):
    """(B, 3, 32, 32) images in [0, 1] -> logits per attribute."""

    def __init__(self, labels: dict[str, list[str]] | None = None, width: int = 32):
        super().__init__()
        self.labels = labels or {"shape": list(SHAPES), "color": list(COLORS), "style": list(STYLES)}
        self.features = nn.Sequential(
            _block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width),  # (B, 4w, 4, 4)
            nn.Flatten(), nn.Linear(16 * 4 * width, 256), nn.ReLU(inplace=True), nn.Dropout(0.1),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in self.labels.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-2:] != (32, 32):  # the classifier sees ToyWorld's native 32 px
            images = nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
        h = self.features(images * 2 - 1)  # (B, 256)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) float in [0, 1] -> {"shape": LongTensor(B), "color": ..., "style": ...}."""
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        logits = self(images.to(device=p.device, dtype=p.dtype))
        self.train(was_training)
        return {k: v.argmax(-1) for k, v in logits.items()}


def save_classifier(model: ToyClassifier, path: str | Path) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path / WEIGHTS_FILE))
    (path / LABELS_FILE).write_text(json.dumps(model.labels, indent=2))


def load_classifier(path: str | Path | None = None, device: str = "cpu") -> ToyClassifier:
    """Load the shipped classifier (or one saved at `path`) in eval mode."""
    from safetensors.torch import load_file

    from . import CLASSIFIER_DIR, require_files

    path = Path(path) if path is not None else CLASSIFIER_DIR
    require_files(path, (WEIGHTS_FILE, LABELS_FILE), "ToyWorld classifier")
    model = ToyClassifier(json.loads((path / LABELS_FILE).read_text()))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path / WEIGHTS_FILE)).items()}
    model.load_state_dict(state)
    return model.to(device).eval()
