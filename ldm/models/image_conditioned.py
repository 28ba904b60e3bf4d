"""The tasks that concatenate an image to z_t, as the paper does for super-resolution and inpainting.

- Super-resolution: the low-resolution image (the original downsampled by the first stage's factor, so it has
  the latent's size: with f=4, the paper's x4) in [-1, 1], 3 channels. Sampled and exported as diffusers'
  ``LDMSuperResolutionPipeline``, which draws latents with as many channels as the image has (its UNet takes
  twice as many: the first stage must have 3 latent channels, as the paper's f=4 ones do) and decodes them
  without dividing by a scaling factor: ``unscaled_first_stage`` folds 1 / scale_factor into the decoder.
- Inpainting: the mask (1 in the hole, at the latent's size) and the latent of the masked image (the hole
  mid-grey), scaled as z is. diffusers has no latent-diffusion inpainting pipeline for a UNet without text, so
  ``InpaintingPipeline`` is this project's: a ``DiffusionPipeline`` (vqvae, unet, scheduler).

encode_latents precomputes what these need from the pixels (``masked_latent`` and ``latent_mask`` here, the
low-resolution image and the pixel mask in its decode tasks), so training still never touches pixels.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ImagePipelineOutput

from ldm.data.images import normalise, resize
from ldm.data.masks import random_mask
from ldm.models.first_stage import FirstStage, encode, factor
from ldm.models.own_pipeline import LatentDiffusionPipeline


def image_conditions(
    concat: str, pixels: np.ndarray, keys: Sequence[str], latent_side: int, masks: np.ndarray | None = None
) -> list[Any]:
    """What the task's pipeline takes for each image (N x H x W x 3 uint8 crops), made as encode_latents made
    it for the training rows: the image downsampled to the latent's size (super-resolution), or the image and
    its mask (inpainting): the given one (N x H x W, 1 in the hole), or the random one its key fixes."""
    if concat == "low_res":
        return list(resize(pixels, latent_side))
    return [
        (image, random_mask(image.shape[0], key) if masks is None else mask)
        for image, key, mask in zip(pixels, keys, masks if masks is not None else [None] * len(pixels))
    ]


def image_tensor(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """N x H x W x 3 uint8 images as the N x 3 x H x W float [-1, 1] tensor the UNet's extra channels take."""
    pixels = pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels
    return torch.from_numpy(normalise(np.asarray(pixels)))


def latent_mask(mask: torch.Tensor, side: int) -> torch.Tensor:
    """An N x H x W mask (1 in the hole) at the latent's ``side``, N x 1 x side x side: a latent cell is in the
    hole when any of its pixels is, so that everything masked is generated."""
    return F.adaptive_max_pool2d(mask[:, None].float(), side)


def masked_latent(first_stage: FirstStage, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The latent (the posterior's mean, or the quantized latent) of ``images`` ([-1, 1]) with the hole
    (``mask`` 1) mid-grey, unscaled."""
    keep = 1 - mask[:, None].to(images.dtype)
    return encode(first_stage, images * keep).mode()


def inpainting_input(mask: torch.Tensor, masked: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """What the inpainting UNet takes beside z_t: the latent-size mask, then the masked image's latent scaled
    as z is (diffusers' inpainting order)."""
    return torch.cat([mask.to(masked.dtype), masked * scale_factor], dim=1)


def unscaled_first_stage(first_stage: FirstStage, scale_factor: float) -> FirstStage:
    """A copy of the first stage that decodes scaled latents (z x scale_factor) directly, for pipelines that
    do not divide by ``scaling_factor`` (``LDMSuperResolutionPipeline``): the weights of the first convolution
    that reads the latent are divided by the scale, and a VQ codebook multiplied by it (so that quantizing a
    scaled latent finds the same code)."""
    folded = copy.deepcopy(first_stage)
    with torch.no_grad():
        # The first layer that reads the latent: post_quant_conv, or the decoder's own input convolution without one.
        first = getattr(folded, "post_quant_conv", None) or folded.decoder.conv_in
        first.weight /= scale_factor
        quantize = getattr(folded, "quantize", None)
        if quantize is not None:
            quantize.embedding.weight *= scale_factor
    folded.register_to_config(scaling_factor=1.0)
    return folded


class InpaintingPipeline(LatentDiffusionPipeline):
    """Fill the holes of images: z_t, the latent-size mask and the masked image's latent into the UNet."""

    def __init__(self, vqvae, unet, scheduler):
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        image: np.ndarray | torch.Tensor,
        mask_image: np.ndarray | torch.Tensor,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
    ) -> ImagePipelineOutput:
        """``image``: N x H x W x 3 uint8 (numpy), or N x 3 x H x W in [-1, 1] (torch); ``mask_image``: N x H x W,
        1 (or True) in the hole. The whole image is generated; outside the hole it follows the original."""
        device, dtype = self._execution_device, self.unet.dtype
        images = (image_tensor(image) if isinstance(image, np.ndarray) else image).to(device, self.vqvae.dtype)
        mask = torch.as_tensor(np.asarray(mask_image) if not isinstance(mask_image, torch.Tensor) else mask_image).to(
            device, self.vqvae.dtype
        )
        side = self.unet.config.sample_size
        size = side * factor(self.vqvae)
        if images.shape[-2:] != (size, size) or mask.shape != (len(images), size, size):
            raise ValueError(
                f"InpaintingPipeline: images of {size} x {size} and masks of the same size, one each (the model's "
                f"resolution); got images {tuple(images.shape)} and masks {tuple(mask.shape)}"
            )
        scale = self.vqvae.config.scaling_factor
        condition = inpainting_input(latent_mask(mask, side), masked_latent(self.vqvae, images, mask), scale).to(dtype)
        return self.denoise(
            len(images),
            lambda latents, t: self.unet(torch.cat([latents, condition], dim=1), t).sample,
            num_inference_steps,
            generator,
            eta,
            dtype,
            output_type,
        )
