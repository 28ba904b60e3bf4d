"""Named model sizes, as DiT names its sizes: the first stages and the text-to-image UNet + τθ.

Plain dataclasses, importable without torch, so a config can be checked against the names before anything
heavy loads. ``ldm.models.first_stage`` and ``ldm.models.text_to_image`` build models from them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass, replace
from typing import Any


@dataclass(frozen=True)
class FirstStagePreset:
    kind: str  # "kl" | "vq"
    block_out_channels: tuple[int, ...]  # ch * ch_mult in the paper's configs
    layers_per_block: int  # num_res_blocks
    latent_channels: int  # z_channels = embed_dim
    attention_levels: tuple[int, ...] = ()  # levels (0 = full resolution) with self-attention: attn_resolutions
    num_vq_embeddings: int | None = None  # n_embed (VQ only)
    norm_num_groups: int = 32

    @property
    def factor(self) -> int:
        """Downsampling factor f: an H x W image becomes an H/f x W/f latent."""
        return 2 ** (len(self.block_out_channels) - 1)


FIRST_STAGE_PRESETS: dict[str, FirstStagePreset] = {
    # The paper's first stages (Rombach et al. 2022, Tab. 8 / the released configs), at 256 x 256.
    "kl-f4": FirstStagePreset("kl", (128, 256, 512), 2, 3),
    "kl-f8": FirstStagePreset("kl", (128, 256, 512, 512), 2, 4),
    "kl-f16": FirstStagePreset("kl", (128, 128, 256, 256, 512), 2, 16, attention_levels=(4,)),
    "vq-f4": FirstStagePreset("vq", (128, 256, 512), 2, 3, num_vq_embeddings=8192),
    "vq-f8": FirstStagePreset("vq", (128, 256, 256, 512), 2, 4, attention_levels=(3,), num_vq_embeddings=16384),
    # For CPUs: 64 x 64 images to 16 x 16 x 4 latents (0.95M parameters). 8 groups, not 32: 32 groups of 32
    # channels is instance norm, which removes each channel's mean (a flat colour) and trained ~2.7x slower
    # here (measured).
    "tiny-kl-f4": FirstStagePreset("kl", (32, 64, 64), 1, 4, norm_num_groups=8),
    "tiny-vq-f4": FirstStagePreset("vq", (32, 64, 64), 1, 4, num_vq_embeddings=256, norm_num_groups=8),
}


def first_stage_preset(
    name_or_spec: str | Mapping[str, Any], fields: Mapping[str, Any] | Any = None, **overrides: Any
) -> FirstStagePreset:
    """A named first-stage preset, or one spelled out as a mapping, with any field overridden: by ``fields`` (a
    config's, where null keeps the preset's) and by keyword."""
    if isinstance(name_or_spec, str):
        if name_or_spec not in FIRST_STAGE_PRESETS:
            raise ValueError(
                f"unknown first-stage preset {name_or_spec!r}; the presets are {sorted(FIRST_STAGE_PRESETS)}"
            )
        spec = FIRST_STAGE_PRESETS[name_or_spec]
    else:
        spec = FirstStagePreset(**_tuples(name_or_spec))
    spec = replace(spec, **_tuples(fields or {}), **_tuples(overrides))
    if spec.kind not in ("kl", "vq") or (spec.kind == "vq") != (spec.num_vq_embeddings is not None):
        raise ValueError(f"a first stage is kind 'kl', or 'vq' with num_vq_embeddings: got {asdict(spec)}")
    return spec


@dataclass(frozen=True)
class UNetSpec:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_levels: tuple[int, ...]  # resolution levels (0 = full latent grid) with cross-attention
    heads: int  # diffusers' ``attention_head_dim`` means the head count in UNet2DConditionModel
    # The levels with self-attention in a UNet without cross-attention (unconditional, super-resolution,
    # inpainting). The paper's unconditional and class-conditional UNets attend at downsampling 2, 4 and 8, never
    # on the full latent grid (attention_resolutions 8, 4, 2 of a 64 x 64 latent): there, each of the h·w
    # positions attends to all others at the UNet's narrowest width, which on the tiny preset took 2.7x a
    # training step's time (measured on one core: 0.58 s against 0.215 s at batch 32).
    self_attention_levels: tuple[int, ...]


TEXT_ENCODER_KINDS = ("ldmbert", "bert")


@dataclass(frozen=True)
class TextEncoderSpec:
    layers: int
    width: int
    heads: int
    ffn: int
    # ldmbert: the paper's τθ (diffusers' LDMBertModel, pre-LayerNorm); bert: transformers' BertModel
    # (post-LayerNorm). A tiny LDMBert collapsed to a near-constant context (about the same features for every
    # caption) in this project's first 2-core quality run; the tiny BertModel did not.
    kind: str = "ldmbert"


@dataclass(frozen=True)
class TextToImagePreset:
    unet: UNetSpec
    text_encoder: TextEncoderSpec


TEXT_TO_IMAGE_PRESETS: dict[str, TextToImagePreset] = {
    # The paper's (CompVis txt2img-1p4B-eval.yaml): UNet 320 channels, mult 1,2,4,4, 2 res blocks, attention at
    # downsampling 4,2,1, 8 heads, context 1280; τθ 32 layers, width 1280 (diffusers' LDMBertModel).
    "txt2img-1p4b": TextToImagePreset(
        UNetSpec((320, 640, 1280, 1280), 2, (0, 1, 2), 8, (1, 2, 3)), TextEncoderSpec(32, 1280, 8, 5120)
    ),
    "mid": TextToImagePreset(UNetSpec((192, 384, 768), 2, (1, 2), 8, (1, 2)), TextEncoderSpec(8, 512, 8, 2048)),
    # For CPUs: 5.9M UNet parameters, cross-attention at 16x16 and 8x8, a 2-layer τθ. 2,400 steps at global
    # batch 64 (47 minutes on 2 cores) took held-out object colour to 0.96, shape 0.98, position and background to 1.00.
    "tiny": TextToImagePreset(
        UNetSpec((64, 128, 128), 1, (0, 1), 4, (1,)), TextEncoderSpec(2, 128, 4, 512, kind="bert")
    ),
}


def text_to_image_preset(
    name: str, unet: Mapping[str, Any] | Any = None, text_encoder: Mapping[str, Any] | Any = None
) -> TextToImagePreset:
    """A named text-to-image preset with any UNet or τθ field overridden (a None one keeps the preset's)."""
    if name not in TEXT_TO_IMAGE_PRESETS:
        raise ValueError(f"unknown text-to-image preset {name!r}; the presets are {sorted(TEXT_TO_IMAGE_PRESETS)}")
    spec = TEXT_TO_IMAGE_PRESETS[name]
    return TextToImagePreset(
        replace(spec.unet, **_tuples(unet or {})), replace(spec.text_encoder, **_tuples(text_encoder or {}))
    )


def describe(spec: TextToImagePreset | FirstStagePreset) -> dict[str, Any]:
    return asdict(spec)


def _tuples(fields: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The fields set (a config spells an unset one null; a Ray Train worker gets the config's dataclass) with
    lists (as configs spell them) as tuples (as the frozen specs hold them)."""
    fields = asdict(fields) if is_dataclass(fields) else fields
    return {
        k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
        for k, v in fields.items()
        if v is not None
    }
