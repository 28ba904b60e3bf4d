"""Deterministic rendering of a scene to RGB pixels and JPEG bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from ldm.synthetic.scene import COLOURS, Scene

COLOUR_JITTER = 12  # per channel, so that no two images of one caption are pixel-identical
NOISE_STD = 3.0


def object_box(scene: Scene, width: int, height: int, seed: int) -> tuple[float, float, float, float]:
    """The box (x0, y0, x1, y1, in pixels) that ``render`` draws the object in: its layout, for layout-to-image."""
    return _draw_plan(scene, width, height, np.random.default_rng(seed))[2]


def render(scene: Scene, width: int, height: int, seed: int) -> np.ndarray:
    """An HxWx3 uint8 image of ``scene``; the same (scene, size, seed) always gives the same pixels."""
    rng = np.random.default_rng(seed)
    background, colour, box = _draw_plan(scene, width, height, rng)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    if scene.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif scene.shape == "square":
        draw.rectangle(box, fill=colour)
    elif scene.shape == "triangle":
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=colour)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")

    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, NOISE_STD, size=(height, width, 3))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _draw_plan(scene: Scene, width: int, height: int, rng: np.random.Generator):
    """The colours and the object's box, in the order ``render`` draws them from ``rng``."""
    side = min(width, height)
    background = _jitter(COLOURS[scene.background], rng)
    colour = _jitter(COLOURS[scene.colour], rng)
    size = rng.uniform(0.28, 0.40) * side
    vertical, horizontal = scene.position.split()
    cx = width * (0.25 if horizontal == "left" else 0.75) + rng.uniform(-0.04, 0.04) * side
    cy = height * (0.25 if vertical == "top" else 0.75) + rng.uniform(-0.04, 0.04) * side
    return background, colour, (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes without chroma subsampling, which would bleed small objects into their background."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255)) for c in rgb)
