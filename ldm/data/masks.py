"""Random inpainting masks, large and small, as the paper trained its inpainting model (after LaMa: wide
strokes and big boxes, or thin strokes and small boxes), drawn from a seed so that a row's mask is fixed by its
key. Numpy and Pillow only: the decode tasks of encode_latents draw them."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageDraw

# (box side, stroke width) ranges as fractions of the image side; a mask is large or small with equal odds.
LARGE = ((0.3, 0.6), (0.08, 0.15))
SMALL = ((0.1, 0.25), (0.03, 0.06))


def random_mask(side: int, seed: int | str) -> np.ndarray:
    """A ``side`` x ``side`` uint8 mask, 1 in the hole: one or two boxes and one to three strokes."""
    rng = np.random.default_rng(int(hashlib.sha1(str(seed).encode()).hexdigest()[:12], 16))
    boxes, strokes = LARGE if rng.random() < 0.5 else SMALL
    image = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 3))):
        w, h = rng.uniform(*boxes, size=2) * side
        x, y = rng.uniform(0, side - w), rng.uniform(0, side - h)
        draw.rectangle((x, y, x + w, y + h), fill=1)
    for _ in range(int(rng.integers(1, 4))):
        points = [tuple(p) for p in rng.uniform(0, side, size=(int(rng.integers(2, 5)), 2))]
        draw.line(points, fill=1, width=max(1, round(rng.uniform(*strokes) * side)), joint="curve")
    return np.asarray(image, dtype=np.uint8)
