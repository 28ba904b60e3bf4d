"""What stage=train_autoencoder runs in Ray Data tasks: the prepared images decoded for the workers."""

from __future__ import annotations

import numpy as np

from ldm.data.images import to_pixels


def pixels(batch: dict[str, np.ndarray], *, resolution: int, train: bool, flip: bool) -> dict[str, np.ndarray]:
    """The batch's images as float32 crops in [-1, 1]: random crops (and flips) for training, center crops for
    the held-out ones."""
    rng = np.random.default_rng() if train else None
    images = [to_pixels(data, resolution, rng, flip) for data in batch["image"]]
    return {"pixels": np.stack(images) if images else np.zeros((0, 3, resolution, resolution), np.float32)}
