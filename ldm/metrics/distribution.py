"""How far generated images are from real ones in a feature space: FID and KID.

The features come from whatever vision model the user points at (an Inception port, CLIP, DINOv2 ...):
nothing is downloaded, so scores are comparable only between runs that used the same extractor.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """||μr - μf||² + Tr(Σr + Σf - 2 (Σr Σf)^½) of two N x D feature sets (Heusel et al., 2017)."""
    mu_r, mu_f = real.mean(0), fake.mean(0)
    sigma_r, sigma_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root, _ = linalg.sqrtm(sigma_r @ sigma_f, disp=False)
    if not np.isfinite(root).all():  # singular product (few samples): regularise, as pytorch-fid does
        offset = np.eye(len(sigma_r)) * 1e-6
        root = linalg.sqrtm((sigma_r + offset) @ (sigma_f + offset))
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(sigma_r) + np.trace(sigma_f) - 2 * np.trace(root.real))


def kernel_distance(
    real: np.ndarray, fake: np.ndarray, subsets: int = 10, subset_size: int = 100, seed: int = 0
) -> tuple[float, float]:
    """KID (Bińkowski et al., 2018): the unbiased MMD² with kernel (x·y / D + 1)³, mean and std over subsets."""
    rng = np.random.default_rng(seed)
    size = min(subset_size, len(real), len(fake))
    dim = real.shape[1]
    values = []
    for _ in range(subsets):
        x, y = real[rng.choice(len(real), size, replace=False)], fake[rng.choice(len(fake), size, replace=False)]
        k_xx, k_yy, k_xy = ((x @ x.T) / dim + 1) ** 3, ((y @ y.T) / dim + 1) ** 3, ((x @ y.T) / dim + 1) ** 3
        off_diagonal = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (size * (size - 1))
        values.append(off_diagonal - 2 * k_xy.mean())
    return float(np.mean(values)), float(np.std(values))


@torch.no_grad()
def image_features(model: torch.nn.Module, processor, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """N x D features of uint8 images: the model's pooled output (or its mean token) after its own
    preprocessing (resize, normalise)."""
    features = []
    device = next(model.parameters()).device
    for start in range(0, len(images), batch_size):
        inputs = processor(images=list(images[start : start + batch_size]), return_tensors="pt").to(device)
        output = model(**inputs)
        pooled = getattr(output, "image_embeds", None)
        if pooled is None:
            pooled = getattr(output, "pooler_output", None)
        if pooled is None:
            pooled = output.last_hidden_state.mean(1)
        features.append(pooled.reshape(len(pooled), -1).float().cpu().numpy())
    return np.concatenate(features).astype(np.float64)
