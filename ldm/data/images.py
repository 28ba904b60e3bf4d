"""Encoded image bytes to training tensors (decode, resize the shorter side, crop, flip, scale to [-1, 1]), and
images back to PNG bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def square_crop(
    data: bytes, resolution: int, rng: np.random.Generator | None = None, flip: bool = False, side: int | None = None
) -> np.ndarray:
    """A ``side`` x ``side`` crop (default: ``resolution``) of the image as uint8 HWC RGB: the shorter side
    resized to ``resolution``, then a random crop (with ``rng``) or the center crop, mirrored half the time if
    ``flip``."""
    side = side or resolution
    if side > resolution:
        raise ValueError(f"a crop of {side} px is larger than the {resolution} px the image is resized to")
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        scale = resolution / min(image.size)
        if scale != 1:
            size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
        pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    if rng is None:
        top, left = (height - side) // 2, (width - side) // 2
    else:
        top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
    pixels = pixels[top : top + side, left : left + side]
    if flip and rng is not None and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels)


def resize(pixels: np.ndarray, side: int) -> np.ndarray:
    """N x H x W x 3 uint8 images to N x side x side x 3, bicubic (antialiased when shrinking, as PIL resizes):
    the super-resolution task's low-resolution input (the paper's bicubic degradation), and its baseline."""
    return (
        np.stack([np.asarray(Image.fromarray(p).resize((side, side), Image.Resampling.BICUBIC)) for p in pixels])
        if len(pixels)
        else np.zeros((0, side, side, 3), np.uint8)
    )


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) to float32 (..., 3, H, W) in [-1, 1], the first stage's input range."""
    return np.moveaxis(pixels, -1, -3).astype(np.float32) / 127.5 - 1.0


def to_pixels(
    data: bytes, resolution: int, rng: np.random.Generator | None = None, flip: bool = False, side: int | None = None
) -> np.ndarray:
    """``square_crop`` as float32 CHW in [-1, 1]."""
    return normalise(square_crop(data, resolution, rng, flip, side))


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of a PIL image or an H x W x 3 uint8 array."""
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()
