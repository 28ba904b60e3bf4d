"""The class-conditional latent diffusion model, as the paper's ImageNet LDM: τθ is a learned embedding of
the class, one token that the UNet's cross-attention reads, with one more entry for the null class that
classifier-free guidance takes as its unconditional branch (training drops labels to it).

diffusers has no UNet pipeline for class labels, so ``ClassConditionalPipeline`` is this task's: a
``DiffusionPipeline`` (vqvae, unet, class_embedder, scheduler) that guides as ``LDMTextToImagePipeline`` does
and saves and loads as any diffusers pipeline directory. Loading one needs this package (its ``model_index.json``
names ``ldm.ClassEmbedder``): ``ClassConditionalPipeline.from_pretrained(dir)``.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor


class ClassEmbedder(ModelMixin, ConfigMixin):
    """τθ for class labels: (batch,) class indices -> (batch, 1, width) context. Index ``num_classes`` is the
    null class. Its output is a tuple, per-token features first, as a transformers encoder's, so the training
    objective calls every τθ alike."""

    @register_to_config
    def __init__(self, num_classes: int, width: int, classes: Sequence[str] = ()):
        super().__init__()
        self.embedding = torch.nn.Embedding(num_classes + 1, width)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def index(self, names: Sequence[str]) -> list[int]:
        """The indices of class names (``config.classes``, in the latents manifest's order)."""
        known = {name: i for i, name in enumerate(self.config.classes)}
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"unknown class(es) {unknown}; the model knows {list(self.config.classes)}")
        return [known[name] for name in names]

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.embedding(labels)[:, None, :],)


class ClassConditionalPipeline(DiffusionPipeline):
    """Images of given classes with classifier-free guidance against the null class."""

    def __init__(self, vqvae, unet, class_embedder: ClassEmbedder, scheduler):
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, class_embedder=class_embedder, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, class_labels: Sequence[str | int], guidance_scale: float = 4.0, num_inference_steps: int = 50,
                 generator: torch.Generator | list[torch.Generator] | None = None, eta: float = 0.0,
                 output_type: str = "pil") -> ImagePipelineOutput:
        """``class_labels``: class names (or indices), one image each."""
        device = self._execution_device
        names = [label for label in class_labels if isinstance(label, str)]
        indices = self.class_embedder.index(names) if len(names) == len(class_labels) else [int(label) for label in class_labels]
        labels = torch.tensor(indices, device=device)
        context = self.class_embedder(labels)[0]
        null = self.class_embedder(torch.full_like(labels, self.class_embedder.null_class))[0]
        size = self.unet.config.sample_size
        latents = randn_tensor((len(indices), self.unet.config.in_channels, size, size), generator=generator, device=device, dtype=context.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        extra = {"eta": eta} if "eta" in inspect.signature(self.scheduler.step).parameters else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            if guidance_scale == 1.0:
                prediction = self.unet(latents, t, encoder_hidden_states=context).sample
            else:
                unconditional, conditional = self.unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([null, context])).sample.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(prediction, t, latents, **extra).prev_sample
        image = (self.vqvae.decode(latents / self.vqvae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        image = image.cpu().permute(0, 2, 3, 1).numpy()
        return ImagePipelineOutput(images=self.numpy_to_pil(image) if output_type == "pil" else image)
