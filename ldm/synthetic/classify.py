"""The deterministic classifier that reads a scene back from pixels (of a rendered or a generated image)."""

from __future__ import annotations

import numpy as np

from ldm.synthetic.scene import COLOURS, Scene

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)
# Palette colours are >= 88 apart; a pixel this far from the background belongs to the object.
OBJECT_DISTANCE = 60.0


def classify(pixels: np.ndarray) -> Scene:
    """Object colour, shape, quadrant and background colour of an HxWx3 uint8 image."""
    image = pixels.astype(np.float32)
    # The object covers at most ~16 % of the image, so the median pixel is background.
    background = np.median(image.reshape(-1, 3), axis=0)
    mask = np.linalg.norm(image - background, axis=-1) > OBJECT_DISTANCE
    background_name = _nearest(background)
    if mask.sum() < 4:
        # Nothing stands out: call it an object of the background's colour, which can never be right.
        return Scene(background_name, "square", "top left", background_name)

    colour = np.median(image[mask], axis=0)
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    position = f"{'top' if ys.mean() < height / 2 else 'bottom'} {'left' if xs.mean() < width / 2 else 'right'}"
    box_area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return Scene(_nearest(colour), _shape(mask.sum() / box_area), position, background_name)


def _nearest(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=-1)))]


def _shape(fill: float) -> str:
    # Fraction of the bounding box covered: triangle 1/2, circle pi/4, square 1.
    if fill < 0.64:
        return "triangle"
    return "circle" if fill < 0.9 else "square"
