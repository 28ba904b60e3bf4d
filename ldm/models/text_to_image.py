"""The latent diffusion model: a UNet with cross-attention to a transformer text encoder τθ(y), or (the
unconditional task) a UNet on z_t alone.

Built from the named presets in ``ldm.models.presets`` (the paper's ``txt2img-1p4b``, ``mid`` for a single
GPU, ``tiny`` for CPU). The latent channels and grid come from the latents' manifest, the vocabulary from the tokenizer.
τθ is trained jointly by default, or is a pretrained encoder kept frozen: BERT-like, CLIP's text tower or
T5's encoder (local, s3:// or hub id, with a subfolder).
"""

from __future__ import annotations

import json
import os

import torch
from diffusers import AutoModel as AutoDiffusersModel
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
from transformers import AutoConfig, AutoModel, BertConfig, BertModel, CLIPTextModel, T5EncoderModel, UMT5EncoderModel

from ldm.choices import ATTENTION
from ldm.devices import DIFFUSERS_LOAD
from ldm.models.conditioners import ClassEmbedder, LayoutEncoder, LearnedConditioner
from ldm.models.presets import TEXT_ENCODER_KINDS, TextEncoderSpec, UNetSpec
from ldm.storage import Storage, pretrained_directory

# Folders of a checkpoint and of a train_ldm output; τθ is a text encoder's, or a class or layout one's.
UNET, TEXT_ENCODER, CONDITIONER, EMA = "unet", "text_encoder", "conditioner", "ema"
CONDITIONERS = {cls.__name__: cls for cls in (ClassEmbedder, LayoutEncoder)}  # by the _class_name of their config.json

# τθ saved by us loads like any transformers encoder (AutoModel), whichever it is.
AutoConfig.register(LDMBertConfig.model_type, LDMBertConfig, exist_ok=True)
AutoModel.register(LDMBertConfig, LDMBertModel, exist_ok=True)


def build_text_encoder(spec: TextEncoderSpec, vocab_size: int, max_length: int) -> torch.nn.Module:
    """A randomly initialised τθ: the paper's LDMBert shape, or a BertModel (both are what
    LDMTextToImagePipeline can load as ``bert``: ``forward(ids)[0]`` is the per-token features)."""
    if spec.width % spec.heads:
        raise ValueError(f"text encoder width {spec.width} is not a multiple of its {spec.heads} heads")
    if spec.kind == "bert":
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=spec.width,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            intermediate_size=spec.ffn,
            max_position_embeddings=max_length,
        )
        return BertModel(config)  # its pooler stays frozen (set_trainable); saved, it loads without warnings
    if spec.kind not in TEXT_ENCODER_KINDS:
        raise ValueError(f"text encoder kind {spec.kind!r}: choose one of {TEXT_ENCODER_KINDS}")
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


def build_unet(
    spec: UNetSpec, latent_channels: int, latent_size: int, context_dim: int | None, extra_channels: int = 0
) -> UNet2DConditionModel | UNet2DModel:
    """A randomly initialised UNet2DConditionModel with cross-attention to ``context_dim`` features, or, with
    ``context_dim`` None, a UNet2DModel (as diffusers' ``LDMPipeline`` and ``LDMSuperResolutionPipeline`` run
    it) with self-attention at the spec's ``self_attention_levels``. It takes ``extra_channels`` more input channels
    than z_t has: what the task concatenates to z_t."""
    levels = range(len(spec.block_out_channels))
    attention = "CrossAttn" if context_dim is not None else "Attn"
    attended = spec.attention_levels if context_dim is not None else spec.self_attention_levels
    common = dict(
        sample_size=latent_size,
        in_channels=latent_channels + extra_channels,
        out_channels=latent_channels,
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=tuple(f"{attention}DownBlock2D" if i in attended else "DownBlock2D" for i in levels),
        up_block_types=tuple(f"{attention}UpBlock2D" if i in attended else "UpBlock2D" for i in reversed(levels)),
    )
    if context_dim is not None:  # UNet2DConditionModel's ``attention_head_dim`` is the head count
        return UNet2DConditionModel(**common, attention_head_dim=spec.heads, cross_attention_dim=context_dim)
    # UNet2DModel's is the width of a head: spec.heads heads at the first level, more at the wider ones.
    return UNet2DModel(**common, attention_head_dim=spec.block_out_channels[0] // spec.heads)


# The text tower of a model type whose AutoModel is more than one (CLIP: text and vision; T5: encoder-decoder).
TEXT_TOWERS = {
    "clip": CLIPTextModel,
    "clip_text_model": CLIPTextModel,
    "t5": T5EncoderModel,
    "mt5": T5EncoderModel,
    "umt5": UMT5EncoderModel,
}


def load_text_encoder(
    name_or_path: str, storage: Storage | None = None, subfolder: str | None = None
) -> torch.nn.Module:
    """A pretrained text encoder (or a τθ we saved) from a hub id, a local directory or ``s3://``, optionally in
    a ``subfolder`` (diffusers repositories keep theirs in ``text_encoder/``), all through ``from_pretrained``;
    object-store directories are copied to local disk first, and loaded in fp32. CLIP (a text-only directory or a whole
    CLIP model) gives its text tower, T5 its encoder, anything else (BERT, LDMBert) ``AutoModel``: each returns the
    per-token features first, which is what τθ(y) is."""
    with pretrained_directory(name_or_path, storage) as local:
        config = AutoConfig.from_pretrained(local, subfolder=subfolder or "")
        # In fp32, whatever it was saved in (transformers 5 keeps the saved dtype): an fp16 release would otherwise
        # hand the fp32 UNet half-precision features. Whoever runs it in half precision casts it (encode_latents).
        return TEXT_TOWERS.get(config.model_type, AutoModel).from_pretrained(
            local, subfolder=subfolder or "", dtype=torch.float32
        )


def set_attention(unet: torch.nn.Module, kind: str, device: torch.device) -> None:
    """``sdpa`` (torch's fused kernels), ``math`` (diffusers' plain matmul + softmax), or ``auto``: math on CPU,
    where the fused kernel's backward took 42 % of a tiny-preset step (math: 1.25x the steps/s, bf16)."""
    if kind not in ATTENTION:
        raise ValueError(f"attention={kind!r}: choose one of {ATTENTION}")
    if kind == "math" or (kind == "auto" and device.type == "cpu"):
        for module in unet.modules():  # UNet2DModel has no set_attn_processor: each attention layer, then
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor())


def save_models(directory: str, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> None:
    """The UNet and τθ (a text encoder, or a class or layout conditioner); a checkpoint of training on precomputed τθ(y)
    has no τθ to save, nor have the tasks without cross-attention (unconditional, super-resolution, inpainting)."""
    unet.save_pretrained(os.path.join(directory, UNET), safe_serialization=True)
    if text_encoder is not None:
        text_encoder.save_pretrained(os.path.join(directory, conditioner_folder(text_encoder)), safe_serialization=True)


def conditioner_folder(conditioner: torch.nn.Module) -> str:
    return CONDITIONER if isinstance(conditioner, LearnedConditioner) else TEXT_ENCODER


def load_models(directory: str) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The UNet (whichever class its config names: a task without τθ has a UNet2DModel) and τθ saved under
    ``directory`` (a checkpoint, its EMA folder, or a train_ldm output); τθ is None when there is none (a
    checkpoint of training on precomputed τθ(y), or a task without a condition)."""
    unet = AutoDiffusersModel.from_pretrained(os.path.join(directory, UNET), **DIFFUSERS_LOAD)
    text, learned = os.path.join(directory, TEXT_ENCODER), os.path.join(directory, CONDITIONER)
    if os.path.isdir(learned):
        with open(os.path.join(learned, "config.json")) as f:
            name = json.load(f).get("_class_name")
        if name not in CONDITIONERS:
            raise ValueError(f"{learned}: a conditioner of class {name!r}; this version knows {sorted(CONDITIONERS)}")
        return unet, CONDITIONERS[name].from_pretrained(learned, **DIFFUSERS_LOAD)
    return unet, load_text_encoder(text) if os.path.isdir(text) else None


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
