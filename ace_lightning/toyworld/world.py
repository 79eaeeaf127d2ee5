"""ToyWorld: the vocabulary (shapes, colours, styles, characters) and the deterministic renderer.

An image is one coloured shape with a fill pattern on a lightly shaded grey background. Everything is
chosen to survive a 4x-downsampling VAE at 32 px (8x8x4 latents): colours are far apart in RGB,
fill patterns have periods of 6-8 px (>= 1.5 latent cells), shapes differ in silhouette.
"""
from __future__ import annotations

import numpy as np

# canonical name -> synonyms (the synonyms are trained to mean exactly the same thing)
SHAPES: dict[str, list[str]] = {
    "circle": ["round disc", "ring"],
    "square": ["box", "block"],
    "triangle": ["pyramid", "wedge"],
    "diamond": ["rhombus", "lozenge"],
    "star": ["pentagram", "sparkle"],
    "heart": ["valentine", "love symbol"],
    "cross": ["plus sign", "cruciform"],
    "crescent": ["moon", "sickle"],
}

# canonical name -> RGB; saturated primaries/secondaries, pairwise RGB distance >= 150 (blue-cyan is closest)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (20, 190, 40),
    "blue": (25, 60, 235),
    "yellow": (250, 225, 20),
    "magenta": (225, 30, 225),
    "cyan": (20, 215, 230),
}

# canonical name -> synonyms; "plain" (solid fill) is also the neutral style
STYLES: dict[str, list[str]] = {
    "plain": ["solid", "filled"],
    "striped": ["stripy", "banded"],
    "dotted": ["spotted", "polka-dot"],
    "checkered": ["chequered", "plaid"],
}

# invented names, each bound to one fixed look (the celebrity analogue)
CHARACTERS: dict[str, tuple[str, str, str]] = {
    "zorblax": ("star", "magenta", "checkered"),
    "mivelle": ("heart", "cyan", "dotted"),
    "quandor": ("triangle", "yellow", "striped"),
    "plimbo": ("crescent", "green", "plain"),
}

# what an erased concept of each kind should turn into; the captions train these on the mixture
NEUTRALS: dict[str, str] = {"object": "shape", "style": "plain", "person": "someone"}

PATTERN_COLOR = (245, 245, 245)  # second colour of striped / dotted / checkered fills
_SUPERSAMPLE = 2  # render at 2x and box-filter down: anti-aliased edges


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in unit shape coordinates (u right, v down; the shape spans about [-1, 1])."""
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.82) & (np.abs(v) <= 0.82)
    if shape == "triangle":  # apex up; three half-planes
        return (v <= 0.8) & (1.75 * u - v <= 0.95) & (-1.75 * u - v <= 0.95)
    if shape == "diamond":
        return np.abs(u) / 0.85 + np.abs(v) <= 1.05
    if shape == "star":  # polar radius alternates linearly between outer and inner points
        theta = np.arctan2(u, -v)  # 0 at the top
        rho = np.sqrt(u**2 + v**2)
        frac = np.abs(((theta / (2 * np.pi / 5)) % 1.0) - 0.5) * 2  # 1 at a point, 0 between points
        return rho <= 0.42 + 0.63 * frac
    if shape == "heart":  # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0
        x, y = 1.15 * u, -1.15 * v + 0.25
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    if shape == "cross":
        arm = 0.34
        return ((np.abs(u) <= arm) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= arm) & (np.abs(u) <= 0.95))
    if shape == "crescent":
        return (u**2 + v**2 <= 1.0) & ((u - 0.5) ** 2 + (v + 0.15) ** 2 > 0.78**2)
    raise ValueError(f"unknown shape {shape!r}; valid: {sorted(SHAPES)}")


def _pattern_mask(style: str, x: np.ndarray, y: np.ndarray, phase: tuple[float, float]) -> np.ndarray:
    """True where the fill shows the main colour (x, y in output pixels)."""
    px, py = x + phase[0], y + phase[1]
    if style == "plain":
        return np.ones_like(x, dtype=bool)
    if style == "striped":  # horizontal bands, period 6 px
        return (py % 6.0) < 3.0
    if style == "dotted":  # pale dots of radius 1.7 px on a 6 px grid
        dx, dy = (px % 6.0) - 3.0, (py % 6.0) - 3.0
        return dx**2 + dy**2 > 1.7**2
    if style == "checkered":  # 4 px cells
        return ((np.floor(px / 4.0) + np.floor(py / 4.0)) % 2) == 0
    raise ValueError(f"unknown style {style!r}; valid: {sorted(STYLES)}")


def render(shape: str, color: str, style: str, seed: int, size: int = 32) -> np.ndarray:
    """Deterministic (H, W, 3) uint8 image of one shape; `seed` sets position, size, tilt and background."""
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; valid: {sorted(COLORS)}")
    rng = np.random.default_rng(seed)
    s = size / 32.0  # all distances are given for 32 px
    radius = rng.uniform(9.5, 12.5) * s
    cx, cy = rng.uniform(-3.0, 3.0, size=2) * s + size / 2
    tilt = rng.uniform(-0.2, 0.2)  # radians
    phase = tuple(rng.uniform(0, 12, size=2) * s)
    grey = rng.uniform(105, 150)
    grad = rng.uniform(-12, 12, size=2)

    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE  # pixel-centre coordinates in output pixels
    x, y = np.meshgrid(coords, coords)  # (n, n)
    dx, dy = (x - cx) / radius, (y - cy) / radius
    c, sn = np.cos(tilt), np.sin(tilt)
    u, v = c * dx + sn * dy, -sn * dx + c * dy

    inside = _shape_mask(shape, u, v)  # (n, n)
    main = _pattern_mask(style, x / s, y / s, phase)
    bg = grey + grad[0] * (x / size - 0.5) + grad[1] * (y / size - 0.5)  # (n, n)
    img = np.repeat(bg[..., None], 3, axis=2)  # (n, n, 3)
    fg = np.where(main[..., None], np.array(COLORS[color], float), np.array(PATTERN_COLOR, float))
    img = np.where(inside[..., None], fg, img)
    img = img.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def random_look(rng: np.random.Generator) -> tuple[str, str, str]:
    """A uniformly random (shape, colour, style)."""
    return (
        str(rng.choice(list(SHAPES))),
        str(rng.choice(list(COLORS))),
        str(rng.choice(list(STYLES))),
    )
