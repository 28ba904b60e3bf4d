"""What stage=train_autoencoder runs in Ray Data tasks: the prepared images decoded for the workers."""

from __future__ import annotations

import zlib

import numpy as np

from ldm.data.images import to_pixels


def pixels(
    batch: dict[str, np.ndarray], *, resolution: int, seed: tuple[int, ...] | None, flip: bool, side: int | None = None
) -> dict[str, np.ndarray]:
    """The batch's images (resized to ``resolution``) as float32 ``side``-pixel crops in [-1, 1]: with ``seed``
    (the stage's seed and the epoch), random crops (and flips) drawn from the seed and each row's key, so a
    resumed epoch crops every image as the first try did; without, center crops (the held-out ones)."""
    side = side or resolution
    images = [
        to_pixels(
            data,
            resolution,
            np.random.default_rng([*seed, zlib.crc32(str(key).encode())]) if seed else None,
            flip,
            side,
        )
        for key, data in zip(batch["key"], batch["image"])
    ]
    return {"pixels": np.stack(images) if images else np.zeros((0, 3, side, side), np.float32)}
