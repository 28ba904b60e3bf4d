"""τθ for the conditions that are not text, as the paper builds them, and the pipeline that samples with them.

- ``ClassEmbedder`` (the paper's ImageNet LDM): a learned embedding of the class, one token that the UNet's
  cross-attention reads, with one more entry for the null class.
- ``LayoutEncoder`` (the paper's layout-to-image LDM): each box becomes three tokens, its class, its
  discretised top-left and its discretised bottom-right corner, and a transformer encodes the sequence; the
  null layout is all padding.

Both turn their conditions into token ids (``tokens``) and give the null condition's (``null_tokens``), which
classifier-free guidance takes as its unconditional branch and training drops conditions to. diffusers has
no UNet pipeline for class labels or layouts, so ``ConditionedPipeline`` is theirs: a ``DiffusionPipeline``
(vqvae, unet, conditioner, scheduler) that guides as ``LDMTextToImagePipeline`` does and saves and loads as
any diffusers pipeline directory. Loading one needs this package (its ``model_index.json`` names
``ldm.models.conditioners``): ``ConditionedPipeline.from_pretrained(dir)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import ImagePipelineOutput
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from diffusers.models.modeling_utils import ModelMixin

from ldm.data.layouts import largest_first, parse_layout
from ldm.models.own_pipeline import LatentDiffusionPipeline


class LearnedConditioner(ModelMixin, ConfigMixin):
    """What both τθ share: a class vocabulary (``config.classes``, in the latents manifest's order) and a
    forward that returns a tuple, per-token features first, as a transformers encoder's, so that training
    calls every τθ alike."""

    def index(self, names: Sequence[str], strict: bool = True) -> list[int | None]:
        """The classes' indices; an unknown class is an error, or (not ``strict``: held-out rows may name a
        class no training row did) None."""
        known = {name: i for i, name in enumerate(self.config.classes)}
        unknown = sorted(set(names) - set(known))
        if unknown and strict:
            raise ValueError(f"unknown class(es) {unknown}; the model knows {list(self.config.classes)}")
        return [known.get(name) for name in names]

    def tokens(self, conditions: Sequence[Any], strict: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def null_tokens(self, count: int) -> torch.Tensor:
        raise NotImplementedError


class ClassEmbedder(LearnedConditioner):
    """(batch,) class indices -> (batch, 1, width) context. Index ``num_classes`` is the null class."""

    @register_to_config
    def __init__(self, num_classes: int, width: int, classes: Sequence[str] = ()):
        super().__init__()
        self.embedding = torch.nn.Embedding(num_classes + 1, width)

    def tokens(self, conditions: Sequence[str | int | None], strict: bool = True) -> torch.Tensor:
        """Class names or indices; None (a row without a label), or an unknown class when not ``strict``, is the
        null class."""
        names = [c for c in conditions if isinstance(c, str)]
        index = dict(zip(names, self.index(names, strict)))
        null = self.config.num_classes
        return torch.tensor(
            [
                null if c is None else (null if index[c] is None else index[c]) if isinstance(c, str) else int(c)
                for c in conditions
            ],
            dtype=torch.long,
        )

    def null_tokens(self, count: int) -> torch.Tensor:
        return torch.full((count,), self.config.num_classes, dtype=torch.long)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.embedding(labels)[:, None, :],)


class LayoutEncoder(LearnedConditioner):
    """Layouts -> (batch, 3 x max_objects, width) context. A layout is a list of boxes
    ``{"label": class, "box": [x0, y0, x1, y1]}`` in [0, 1] of the image (or its JSON text, as a ``boxes``
    column holds it). Corners are discretised to a ``grid`` x ``grid`` lattice. The vocabulary: the classes,
    then the grid's cells, then padding; a layout with more than ``max_objects`` boxes keeps its largest."""

    @register_to_config
    def __init__(
        self,
        num_classes: int,
        width: int,
        layers: int,
        heads: int,
        max_objects: int,
        grid: int,
        classes: Sequence[str] = (),
    ):
        super().__init__()
        self.embedding = torch.nn.Embedding(num_classes + grid * grid + 1, width)
        # The cells start from 2-D sinusoids of their row and column, not from noise: neighbouring cells start
        # alike and the corner's side of the image is readable from the first step. From noise, each of the
        # grid² cells had to be learned from the few boxes that start in it: after 450 steps on the synthetic
        # corpus the model still put the object in a random quadrant.
        with torch.no_grad():
            self.embedding.weight[num_classes : num_classes + grid * grid] = get_2d_sincos_pos_embed(
                width, grid, base_size=grid
            )
        self.position = torch.nn.Parameter(torch.randn(1, 3 * max_objects, width) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.transformer = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)

    @property
    def pad(self) -> int:
        return self.config.num_classes + self.config.grid**2

    def tokens(self, conditions: Sequence[str | list[dict[str, Any]] | None], strict: bool = True) -> torch.Tensor:
        """Layouts; when not ``strict``, a box of an unknown class is left out."""
        return torch.tensor([self._layout_tokens(layout, strict) for layout in conditions], dtype=torch.long)

    def null_tokens(self, count: int) -> torch.Tensor:
        return torch.full((count, 3 * self.config.max_objects), self.pad, dtype=torch.long)

    def _layout_tokens(self, layout: str | list[dict[str, Any]] | None, strict: bool) -> list[int]:
        boxes = parse_layout(layout)
        indexed = [
            {**b, "index": i} for b, i in zip(boxes, self.index([b["label"] for b in boxes], strict)) if i is not None
        ]
        grid, classes = self.config.grid, self.config.num_classes
        cell = lambda v: min(grid - 1, max(0, v))  # noqa: E731
        ids = []
        for label, (x0, y0, x1, y1) in (
            (b["index"], b["box"]) for b in largest_first(indexed)[: self.config.max_objects]
        ):
            top_left = cell(math.floor(y0 * grid)) * grid + cell(math.floor(x0 * grid))
            bottom_right = cell(math.ceil(y1 * grid) - 1) * grid + cell(math.ceil(x1 * grid) - 1)
            ids += [label, classes + top_left, classes + bottom_right]
        return ids + [self.pad] * (3 * self.config.max_objects - len(ids))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.norm(self.transformer(self.embedding(tokens) + self.position)),)


class ConditionedPipeline(LatentDiffusionPipeline):
    """Images of given classes or layouts with classifier-free guidance against the null condition."""

    def __init__(self, vqvae, unet, conditioner: LearnedConditioner, scheduler):
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, conditioner=conditioner, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        conditions: Sequence[Any],
        guidance_scale: float = 4.0,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
    ) -> ImagePipelineOutput:
        """``conditions``: one image each; class names (or indices) for a class embedder, layouts for a layout
        encoder."""
        tokens = self.conditioner.tokens(conditions).to(self._execution_device)
        context = self.conditioner(tokens)[0]
        null = self.conditioner(self.conditioner.null_tokens(len(tokens)).to(tokens.device))[0]

        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if guidance_scale == 1.0:
                return self.unet(latents, t, encoder_hidden_states=context).sample
            unconditional, conditional = self.unet(
                torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([null, context])
            ).sample.chunk(2)
            return unconditional + guidance_scale * (conditional - unconditional)

        return self.denoise(len(tokens), predict, num_inference_steps, generator, eta, context.dtype, output_type)
