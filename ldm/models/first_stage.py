"""The first stage: perceptual-compression autoencoders E/D, KL- or VQ-regularised, as diffusers models.

Built from the named presets in ``ldm.models.presets`` (the paper's sizes, plus tiny ones that train on a
CPU). One interface over both kinds: ``encode`` gives the posterior moments (KL) or the
quantized latent (VQ), ``decode`` maps a latent back to pixels in [-1, 1].
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, VQModel

from ldm.data.images import normalise
from ldm.devices import DIFFUSERS_LOAD
from ldm.latents import KL_COLUMNS, VQ_COLUMNS
from ldm.models.presets import FirstStagePreset
from ldm.storage import Storage, pretrained_directory

FirstStage = AutoencoderKL | VQModel


def build_first_stage(spec: FirstStagePreset, logvar_bias: float | None = None) -> FirstStage:
    """A randomly initialised diffusers model for ``spec``.

    ``logvar_bias`` (KL only) starts the encoder's log-variance outputs there instead of at 0: with a tiny
    model, unit posterior noise otherwise drowns the latent early in training. Measured on 2 cores: with the
    plain recipe (bias 0, unweighted L1) the object's colour survived reconstruction in a third of the images
    after 4.6 minutes; with this bias and foreground-weighted L1 + MSE, in all of them after 10 minutes.
    """
    levels = range(len(spec.block_out_channels))
    down = tuple("AttnDownEncoderBlock2D" if i in spec.attention_levels else "DownEncoderBlock2D" for i in levels)
    up = tuple("AttnUpDecoderBlock2D" if i in spec.attention_levels else "UpDecoderBlock2D" for i in reversed(levels))
    common = dict(
        down_block_types=down,
        up_block_types=up,
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.norm_num_groups,
    )
    if spec.kind == "vq":
        return VQModel(**common, num_vq_embeddings=spec.num_vq_embeddings, vq_embed_dim=spec.latent_channels)
    model = AutoencoderKL(**common)
    if logvar_bias is not None:
        with torch.no_grad():  # quant_conv's output is (mean, logvar) stacked on the channel axis
            model.quant_conv.bias[spec.latent_channels :].fill_(logvar_bias)
    return model


def load_first_stage(name_or_path: str, storage: Storage | None = None, subfolder: str | None = None) -> FirstStage:
    """A pretrained first stage from a diffusers directory: a hub id, a local path or an ``s3://`` URL.

    Hub ids and local directories take the same ``from_pretrained`` path; the class (AutoencoderKL or
    VQModel) comes from the saved config. Object-store directories are copied to local disk first. It loads in
    fp32 whatever it was saved in (fp16 releases are common); ``for_inference`` casts it for half-precision encoding.
    """
    with pretrained_directory(name_or_path, storage) as local:
        config = _config(local, subfolder)
        cls = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}.get(config.get("_class_name"))
        if cls is None:
            raise ValueError(f"{name_or_path}: a {config.get('_class_name')!r}, not an AutoencoderKL or VQModel")
        return cls.from_pretrained(local, subfolder=subfolder, **DIFFUSERS_LOAD)


def _config(name_or_path: str, subfolder: str | None) -> dict[str, Any]:
    local = os.path.join(name_or_path, subfolder or "", "config.json")
    if os.path.exists(local):
        with open(local) as f:
            return json.load(f)
    return AutoencoderKL.load_config(name_or_path, subfolder=subfolder)  # a hub id: any diffusers config


def kind(model: FirstStage) -> str:
    return "vq" if isinstance(model, VQModel) else "kl"


def factor(model: FirstStage) -> int:
    return 2 ** (len(model.config.block_out_channels) - 1)


@dataclass
class Encoded:
    """What the encoder gives: posterior moments (KL), or the quantized latent and its codebook terms (VQ)."""

    mean: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
    latent: torch.Tensor | None = None  # quantized (VQ)
    codebook_loss: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ q(z|x) (KL), or the quantized latent (VQ)."""
        if self.latent is not None:
            return self.latent
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def mode(self) -> torch.Tensor:
        return self.latent if self.latent is not None else self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per sample, summed over latent elements (zero for VQ)."""
        if self.mean is None:
            return torch.zeros(self.latent.shape[0], device=self.latent.device)
        return 0.5 * torch.sum(self.mean**2 + self.logvar.exp() - 1.0 - self.logvar, dim=(1, 2, 3))


def encode(model: FirstStage, images: torch.Tensor) -> Encoded:
    """``images`` in [-1, 1], N x 3 x H x W."""
    if isinstance(model, VQModel):
        h = model.encode(images).latents
        # The nearest-code search in fp32 whatever the encoder ran in: in bf16, a fifth of the choices among
        # 8,192 codes differed from fp32's (measured on CPU).
        with torch.autocast(h.device.type, enabled=False):
            quant, codebook_loss, (_, _, indices) = model.quantize(h.float())
        return Encoded(latent=quant, codebook_loss=codebook_loss, indices=indices)
    moments = model.encode(images).latent_dist
    # diffusers clamps logvar to [-30, 20] in DiagonalGaussianDistribution, as CompVis does.
    return Encoded(mean=moments.mean, logvar=moments.logvar)


def for_inference(model: FirstStage, device: torch.device, dtype: torch.dtype) -> FirstStage:
    """``model`` on ``device`` in ``dtype`` for encoding, in eval mode; a VQ model's codebook stays fp32 (``encode``
    searches it in fp32)."""
    # torch's own ``to``: diffusers' warns on every dtype cast, even of a model with no module to keep in fp32;
    # the one this model has (the codebook) is kept here.
    model = torch.nn.Module.to(model, device, dtype).eval()
    if isinstance(model, VQModel):
        model.quantize.to(torch.float32)
    return model


@torch.no_grad()
def encode_pixels(
    model: FirstStage, pixels: np.ndarray, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, np.ndarray]:
    """uint8 N x H x W x 3 crops to float16 latent arrays, N x c x h x w, by column name."""
    images = torch.from_numpy(normalise(pixels)).to(device=device, dtype=dtype)
    encoded = encode(model, images)
    if encoded.latent is not None:
        return {VQ_COLUMNS[0]: encoded.latent.to(torch.float16).cpu().numpy()}
    mean, logvar = KL_COLUMNS
    return {mean: encoded.mean.to(torch.float16).cpu().numpy(), logvar: encoded.logvar.to(torch.float16).cpu().numpy()}


def decode(model: FirstStage, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in (about) [-1, 1] from a latent: z for KL, the quantized latent for VQ."""
    if isinstance(model, VQModel):
        return model.decode(latents, force_not_quantize=True).sample
    return model.decode(latents).sample


class Reconstruct(torch.nn.Module):
    """encode -> z -> decode as one forward, so that DDP sees (and synchronises) the whole autoencoder."""

    def __init__(self, model: FirstStage):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, Encoded]:
        encoded = encode(self.model, images)
        return decode(self.model, encoded.sample() if sample else encoded.mode()), encoded


def last_layer(model: FirstStage) -> torch.Tensor:
    """The decoder's output convolution weight: the adaptive GAN weight balances gradients there."""
    return model.decoder.conv_out.weight
