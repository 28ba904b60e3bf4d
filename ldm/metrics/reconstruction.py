"""How well a first stage reconstructs held-out images: PSNR, SSIM, for VQ codebook usage, and on the
synthesizer's scenes how often the reconstruction still shows the original's colour, shape, position and
background (PSNR alone hides a lost shape: the object is a few percent of the pixels)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ldm.grids import to_uint8
from ldm.metrics.adherence import ATTRIBUTES
from ldm.models.first_stage import FirstStage, decode, encode
from ldm.synthetic.classify import read


@dataclass
class ReconstructionMetrics:
    psnr: float
    ssim: float
    images: int
    codebook_usage: float | None = None  # fraction of VQ codes used at least once
    codebook_perplexity: float | None = None  # exp(entropy) of code use: the number of codes "in use"
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        values = {"psnr": self.psnr, "ssim": self.ssim, "images": self.images, **self.extra}
        if self.codebook_usage is not None:
            values.update(codebook_usage=self.codebook_usage, codebook_perplexity=self.codebook_perplexity)
        return {f"{prefix}{k}": float(v) for k, v in values.items()}


@torch.no_grad()
def evaluate_reconstruction(
    model: FirstStage, batches: Iterable[torch.Tensor], scenes: bool = False
) -> ReconstructionMetrics:
    """Mean per-image PSNR and SSIM (images mapped from [-1, 1] to [0, 1]) of ``decode(encode(x).mode())``.
    With ``scenes`` (synthetic data), also ``scene_<attribute>``: the fraction of images whose reconstruction
    the scene classifier reads as it reads the original, and ``scene_all`` for all four at once."""
    was_training = model.training
    model.eval()
    psnr_sum = ssim_sum = 0.0
    count = 0
    codes: torch.Tensor | None = None
    agree: dict[str, float] = {a: 0.0 for a in (*ATTRIBUTES, "all")} if scenes else {}
    for images in batches:
        encoded = encode(model, images)
        reconstructions = decode(model, encoded.mode())
        real = ((images + 1) / 2).clamp(0, 1).float()
        fake = ((reconstructions + 1) / 2).clamp(0, 1).float()
        psnr = peak_signal_noise_ratio(fake, real, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(fake, real, data_range=1.0, reduction="none")
        psnr_sum += psnr.sum().item()
        ssim_sum += ssim.sum().item()
        count += images.shape[0]
        if scenes:
            for a, b in zip(to_uint8(images).numpy(), to_uint8(reconstructions).numpy()):
                before, after = read(a).scene, read(b).scene
                for name in ATTRIBUTES:
                    agree[name] += getattr(before, name) == getattr(after, name)
                agree["all"] += before == after
        if encoded.indices is not None:
            used = torch.bincount(encoded.indices.flatten(), minlength=model.config.num_vq_embeddings)
            codes = used if codes is None else codes + used
    model.train(was_training)
    if count == 0:
        raise ValueError("no images to evaluate the reconstruction on")
    metrics = ReconstructionMetrics(
        psnr=psnr_sum / count,
        ssim=ssim_sum / count,
        images=count,
        extra={f"scene_{name}": right / count for name, right in agree.items()},
    )
    if codes is not None:
        p = codes.float() / codes.sum()
        metrics.codebook_usage = (codes > 0).float().mean().item()
        metrics.codebook_perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()
    return metrics
