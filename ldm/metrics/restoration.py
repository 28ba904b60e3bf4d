"""How well super-resolution and inpainting models restore held-out images, beside the baselines they must beat.

Super-resolution: PSNR and SSIM of the upsampled image against the high-resolution original, beside bicubic
upsampling of the same low-resolution input. Inpainting: PSNR inside the hole against the original, beside
filling the hole with the mean colour of the pixels round it, and PSNR outside it (the model generates the
whole image: how faithfully it keeps what it was given). Images are uint8, compared in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ldm.data.images import resize

# The ring round a hole whose mean colour the baseline fills it with, as a fraction of the image side.
RING = 1 / 16


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255


def _psnr_ssim(fake: np.ndarray, real: np.ndarray) -> tuple[float, float]:
    fake_t, real_t = _tensor(fake), _tensor(real)
    psnr = peak_signal_noise_ratio(fake_t, real_t, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(fake_t, real_t, data_range=1.0, reduction="none")
    return float(psnr.mean()), float(ssim.mean())


def super_resolution_scores(originals: np.ndarray, generated: np.ndarray, low: np.ndarray) -> dict[str, float]:
    """``psnr`` / ``ssim`` of ``generated`` against ``originals``, and ``bicubic_psnr`` / ``bicubic_ssim`` of
    bicubic upsampling of ``low`` (the model's inputs)."""
    if not (len(originals) == len(generated) == len(low)) or not len(originals):
        raise ValueError(f"{len(originals)} originals, {len(generated)} generated and {len(low)} low-resolution images")
    psnr, ssim = _psnr_ssim(generated, originals)
    base_psnr, base_ssim = _psnr_ssim(resize(low, originals.shape[1]), originals)
    return {
        "psnr": psnr,
        "ssim": ssim,
        "bicubic_psnr": base_psnr,
        "bicubic_ssim": base_ssim,
        "factor": originals.shape[1] // low.shape[1],
        "images": len(originals),
    }


def _masked_psnr(fake: np.ndarray, real: np.ndarray, where: np.ndarray) -> float:
    """Mean over images of the PSNR over the pixels ``where`` is true (images with none are left out)."""
    values = []
    for f, r, w in zip(fake.astype(np.float64) / 255, real.astype(np.float64) / 255, where):
        if w.any():
            values.append(10 * np.log10(1 / max(float(np.mean((f[w] - r[w]) ** 2)), 1e-10)))
    return float(np.mean(values)) if values else float("nan")


def mean_fill(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Each hole filled with the mean colour of the ring of pixels round it (the baseline)."""
    filled = images.copy()
    width = max(1, round(RING * images.shape[1]))
    for image, hole in zip(filled, masks.astype(bool)):
        ring = ndimage.binary_dilation(hole, iterations=width) & ~hole
        image[hole] = np.round(image[ring if ring.any() else ~hole].mean(axis=0)) if (~hole).any() else 127
    return filled


def inpainting_scores(originals: np.ndarray, generated: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """``psnr_hole`` (inside the holes, ``masks`` 1) and ``psnr_outside`` of ``generated`` against
    ``originals``, and ``mean_fill_psnr_hole`` of the baseline; ``hole_fraction``: the mean share of the holes."""
    if not (len(originals) == len(generated) == len(masks)) or not len(originals):
        raise ValueError(f"{len(originals)} originals, {len(generated)} generated images and {len(masks)} masks")
    hole = masks.astype(bool)
    return {
        "psnr_hole": _masked_psnr(generated, originals, hole),
        "psnr_outside": _masked_psnr(generated, originals, ~hole),
        "mean_fill_psnr_hole": _masked_psnr(mean_fill(originals, masks), originals, hole),
        "hole_fraction": float(hole.mean()),
        "images": len(originals),
    }
