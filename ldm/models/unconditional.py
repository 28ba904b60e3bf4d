"""The unconditional latent diffusion model: a UNet on z_t alone (no cross-attention, no τθ), as the paper's
CelebA-HQ, FFHQ and LSUN models, and as diffusers' ``LDMPipeline`` samples it. Built from the UNet half of the
named presets in ``ldm.models.presets``; its attention levels get self-attention instead."""

from __future__ import annotations

from diffusers import UNet2DModel

from ldm.models.presets import UNetSpec


def build_unet(spec: UNetSpec, latent_channels: int, latent_size: int) -> UNet2DModel:
    """A randomly initialised UNet2DModel; ``spec.heads`` heads at the first level (UNet2DModel's
    ``attention_head_dim`` is the width of a head, so deeper, wider levels get more)."""
    levels = range(len(spec.block_out_channels))
    return UNet2DModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if i in spec.attention_levels else "DownBlock2D" for i in levels),
        up_block_types=tuple("AttnUpBlock2D" if i in spec.attention_levels else "UpBlock2D" for i in reversed(levels)),
        attention_head_dim=spec.block_out_channels[0] // spec.heads,
    )
