"""The deterministic classifier that reads a scene back from pixels (of a rendered or a generated image).

Generated and reconstructed images are not clean renders: stray pixels, speckle, blur, halos round the
object and JPEG blocks. So the image is smoothed before it is thresholded against its background, the mask
is opened (specks and one-pixel lines go), and only the largest connected component is judged; every other
component big enough to be an object is counted, so an image that holds two objects says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ldm.synthetic.scene import COLOURS, Scene

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)
# Palette colours are >= 88 apart; a (smoothed) pixel this far from the background belongs to an object.
OBJECT_DISTANCE = 60.0
# Smoothing before the threshold: averages speckle down (sigma 20 per pixel to ~6) and spreads a lone outlier
# pixel below the threshold, while a rendered object (>= 18 px across at 64 px) keeps its outline.
SMOOTHING_SIGMA = 1.0
# A component is an object when it covers this fraction of the image (a rendered object covers >= 4 %), and
# at least this fraction of the largest one.
MIN_OBJECT_AREA, MIN_OBJECT_RATIO = 0.005, 0.2
# The corner squares of an object's box, as a fraction of its side: a circle covers ~1/4 of them, a square
# all, one with rounded corners (radius up to ~0.15 of its side) still ~0.9.
CORNER = 0.2


@dataclass(frozen=True)
class Reading:
    """What the classifier sees: the scene of the largest object, its box (x0, y0, x1, y1 in [0, 1] of the
    image; None when there is no object), and how many objects the image holds."""

    scene: Scene
    objects: int
    box: tuple[float, float, float, float] | None = None


def read(pixels: np.ndarray) -> Reading:
    """The scene of the largest object in an HxWx3 uint8 image, and the number of objects in it (0: none)."""
    image = pixels.astype(np.float32)
    smooth = ndimage.gaussian_filter(image, sigma=(SMOOTHING_SIGMA, SMOOTHING_SIGMA, 0))
    # The object covers at most ~16 % of the image, so the median pixel is background.
    background = np.median(smooth.reshape(-1, 3), axis=0)
    background_name = _nearest(background)
    mask = np.linalg.norm(smooth - background, axis=-1) > OBJECT_DISTANCE
    mask = ndimage.binary_opening(mask, structure=np.ones((2, 2), bool))
    labels, areas = _components(mask)
    if not len(areas) or areas.max() < MIN_OBJECT_AREA * mask.size:
        # Nothing stands out: an object of the background's colour, which can never be right.
        return Reading(Scene(background_name, "square", "top left", background_name), 0)
    largest = labels == 1 + int(np.argmax(areas))  # _largest, from the areas the count needs too
    objects = int(np.sum((areas >= MIN_OBJECT_AREA * mask.size) & (areas >= MIN_OBJECT_RATIO * areas.max())))

    # The colour from the component's interior in the unsmoothed image: blur and halos live on the rim.
    interior = ndimage.binary_erosion(largest)
    colour = np.median(image[interior if interior.sum() >= 4 else largest], axis=0)
    # The outline where the smoothed image is half-way from the background to the object's colour: a blurred
    # edge keeps its place there, whatever the contrast, where a fixed distance would grow or shrink it.
    axis = colour - background
    halfway = (smooth - background) @ axis / max(float(axis @ axis), 1e-6) > 0.5
    outline = _largest(halfway & ndimage.binary_dilation(largest, iterations=2)) if halfway[largest].any() else largest
    ys, xs = np.nonzero(outline)
    height, width = mask.shape
    position = f"{'top' if ys.mean() < height / 2 else 'bottom'} {'left' if xs.mean() < width / 2 else 'right'}"
    box = (xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height)
    return Reading(
        Scene(
            _nearest(colour),
            _shape(outline[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]),
            position,
            background_name,
        ),
        objects,
        tuple(float(v) for v in box),
    )


def classify(pixels: np.ndarray) -> Scene:
    """Object colour, shape, quadrant and background colour of an HxWx3 uint8 image (its largest object)."""
    return read(pixels).scene


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mask's connected components as labels 1..n, and the area of each."""
    labels, count = ndimage.label(mask)
    return labels, np.bincount(labels.ravel(), minlength=count + 1)[1:]


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, areas = _components(mask)
    return labels == 1 + int(np.argmax(areas))


def _nearest(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=-1)))]


def _shape(box: np.ndarray) -> str:
    """The shape of a mask cropped to its bounding box. A triangle (apex up) is narrow at the top and wide at
    the bottom; a circle and a square are as wide at both, and a square fills the corners of its box where a
    circle leaves them empty. Widths and corners, not the fill of the box: blur takes the apex off a triangle
    (a shorter box, a larger fill) and rounds a square's corners (a decoder's squares have round corners)."""
    widths = box.sum(axis=1)
    third = max(1, len(widths) // 3)
    if widths[:third].mean() < 0.7 * widths[-third:].mean():
        return "triangle"
    h, w = max(1, round(CORNER * box.shape[0])), max(1, round(CORNER * box.shape[1]))
    corners = np.mean([box[:h, :w].mean(), box[:h, -w:].mean(), box[-h:, :w].mean(), box[-h:, -w:].mean()])
    return "square" if corners > 0.55 else "circle"
