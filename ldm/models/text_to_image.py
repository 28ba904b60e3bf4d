"""The latent diffusion model: a UNet with cross-attention to a transformer text encoder τθ(y).

Named presets (as DiT names its sizes): the paper's ``txt2img-1p4b`` (CompVis ``txt2img-1p4B-eval.yaml``: UNet
320 channels, mult 1,2,4,4, 2 res blocks, attention at downsampling 4,2,1, 8 heads, context 1280; τθ 32
layers, width 1280, which diffusers ships as ``LDMBertModel``), a ``mid`` size for a single GPU, and ``tiny``
for CPU. The latent channels and grid come from the latents' manifest, the vocabulary from the tokenizer.
τθ is trained jointly by default; ``text_encoder`` may instead name a pretrained transformers encoder
(local, s3:// or hub id), kept frozen.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Sequence

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
from transformers import AutoConfig, AutoModel, BertConfig, BertModel

from ldm.storage import Storage

UNET, TEXT_ENCODER, EMA = "unet", "text_encoder", "ema"  # folders of a checkpoint and of a train_ldm output

# τθ saved by us loads like any transformers encoder (AutoModel), whichever it is.
AutoConfig.register(LDMBertConfig.model_type, LDMBertConfig, exist_ok=True)
AutoModel.register(LDMBertConfig, LDMBertModel, exist_ok=True)


@dataclass(frozen=True)
class UNetSpec:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_levels: tuple[int, ...]  # resolution levels (0 = full latent grid) with cross-attention
    heads: int  # diffusers' ``attention_head_dim`` means the head count in UNet2DConditionModel


@dataclass(frozen=True)
class TextEncoderSpec:
    layers: int
    width: int
    heads: int
    ffn: int
    # ldmbert: the paper's τθ (diffusers' LDMBertModel, pre-LayerNorm); bert: transformers' BertModel
    # (post-LayerNorm). A tiny LDMBert trained on CPU collapsed to a near-constant context (DESIGN.md).
    kind: str = "ldmbert"


@dataclass(frozen=True)
class TextToImagePreset:
    unet: UNetSpec
    text_encoder: TextEncoderSpec


PRESETS: dict[str, TextToImagePreset] = {
    "txt2img-1p4b": TextToImagePreset(UNetSpec((320, 640, 1280, 1280), 2, (0, 1, 2), 8), TextEncoderSpec(32, 1280, 8, 5120)),
    "mid": TextToImagePreset(UNetSpec((192, 384, 768), 2, (1, 2), 8), TextEncoderSpec(8, 512, 8, 2048)),
    # DESIGN.md's measured CPU model: 5.9M UNet params, cross-attention at 16x16 and 8x8, a 2-layer τθ.
    "tiny": TextToImagePreset(UNetSpec((64, 128, 128), 1, (0, 1), 4), TextEncoderSpec(2, 128, 4, 512, kind="bert")),
}


def preset(name: str, unet: Mapping[str, Any] | None = None, text_encoder: Mapping[str, Any] | None = None) -> TextToImagePreset:
    """A named preset with any UNet or τθ field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown text-to-image preset {name!r}; the presets are {sorted(PRESETS)}")
    tuples = lambda fields: {k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for k, v in (fields or {}).items()}  # noqa: E731
    spec = PRESETS[name]
    return TextToImagePreset(replace(spec.unet, **tuples(unet)), replace(spec.text_encoder, **tuples(text_encoder)))


def build_text_encoder(spec: TextEncoderSpec, vocab_size: int, max_length: int) -> torch.nn.Module:
    """A randomly initialised τθ: the paper's LDMBert shape, or a BertModel (both are what
    LDMTextToImagePipeline can load as ``bert``: ``forward(ids)[0]`` is the per-token features)."""
    if spec.width % spec.heads:
        raise ValueError(f"text encoder width {spec.width} is not a multiple of its {spec.heads} heads")
    if spec.kind == "bert":
        config = BertConfig(vocab_size=vocab_size, hidden_size=spec.width, num_hidden_layers=spec.layers,
                            num_attention_heads=spec.heads, intermediate_size=spec.ffn, max_position_embeddings=max_length)
        return BertModel(config)  # its pooler stays frozen (set_trainable); saved, it loads without warnings
    if spec.kind != "ldmbert":
        raise ValueError(f"text encoder kind {spec.kind!r}: choose ldmbert or bert")
    config = LDMBertConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_length,
        encoder_layers=spec.layers,
        encoder_ffn_dim=spec.ffn,
        encoder_attention_heads=spec.heads,
        head_dim=spec.width // spec.heads,
        d_model=spec.width,
    )
    return LDMBertModel(config)


def build_unet(spec: UNetSpec, latent_channels: int, latent_size: int, context_dim: int) -> UNet2DConditionModel:
    """A randomly initialised UNet2DConditionModel with cross-attention to ``context_dim`` features."""
    levels = range(len(spec.block_out_channels))
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in spec.attention_levels else "DownBlock2D" for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in spec.attention_levels else "UpBlock2D" for i in reversed(levels)),
        attention_head_dim=spec.heads,
        cross_attention_dim=context_dim,
    )


def load_text_encoder(name_or_path: str, storage: Storage | None = None) -> torch.nn.Module:
    """A pretrained transformers text encoder (or a τθ we saved): hub id, local directory or ``s3://``, all
    through ``AutoModel.from_pretrained``; object-store directories are copied to local disk first."""
    if name_or_path.startswith(("s3://", "s3a://")):
        if storage is None:
            raise ValueError(f"loading the text encoder at {name_or_path} needs the storage config")
        with storage.local_directory(name_or_path) as local:
            return AutoModel.from_pretrained(local)
    return AutoModel.from_pretrained(name_or_path)


def set_attention(unet: UNet2DConditionModel, kind: str, device: torch.device) -> None:
    """``sdpa`` (torch's fused kernels), ``math`` (diffusers' plain matmul + softmax), or ``auto``: math on CPU,
    where the fused kernel's backward took 42 % of a tiny-preset step (math: 1.25x the steps/s, bf16)."""
    if kind not in ("auto", "sdpa", "math"):
        raise ValueError(f"attention={kind!r}: choose auto, sdpa or math")
    if kind == "math" or (kind == "auto" and device.type == "cpu"):
        unet.set_attn_processor(AttnProcessor())


def save_models(directory: str, unet: UNet2DConditionModel, text_encoder: torch.nn.Module) -> None:
    unet.save_pretrained(os.path.join(directory, UNET), safe_serialization=True)
    text_encoder.save_pretrained(os.path.join(directory, TEXT_ENCODER), safe_serialization=True)


def load_models(directory: str) -> tuple[UNet2DConditionModel, torch.nn.Module]:
    """The UNet and τθ saved under ``directory`` (a checkpoint, its EMA folder, or a train_ldm output)."""
    unet = UNet2DConditionModel.from_pretrained(os.path.join(directory, UNET))
    return unet, load_text_encoder(os.path.join(directory, TEXT_ENCODER))


def context_width(text_encoder: torch.nn.Module) -> int:
    """The width of τθ's output features, which the UNet's cross-attention reads."""
    config = text_encoder.config
    return getattr(config, "d_model", None) or config.hidden_size


def set_trainable(text_encoder: torch.nn.Module, train: bool) -> None:
    """Train τθ (or keep it frozen). Heads after the per-token features never are (LDMBert's ``to_logits``, a
    BERT pooler): they get no gradient, and a parameter without gradients stops DDP."""
    text_encoder.requires_grad_(train)
    for head in ("to_logits", "pooler"):
        if getattr(text_encoder, head, None) is not None:
            getattr(text_encoder, head).requires_grad_(False)


def encode_text(text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """τθ(y): per-token features. Called without an attention mask, as LDMTextToImagePipeline calls it, so
    that training, our sampler and the exported pipeline see the same context."""
    return text_encoder(input_ids)[0]


def describe(spec: TextToImagePreset) -> dict[str, Any]:
    return asdict(spec)
