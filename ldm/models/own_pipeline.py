"""What this project's own diffusers pipelines (``ConditionedPipeline``, ``InpaintingPipeline``) share: a
``DiffusionPipeline`` with a first stage as ``vqvae``, a UNet and a scheduler, whose denoising loop and decode
are diffusers' latent-diffusion pipelines' (noise scaled by ``init_noise_sigma``, ``eta`` where the scheduler
takes it, latents divided by the first stage's ``scaling_factor`` before decoding)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class LatentDiffusionPipeline(DiffusionPipeline):
    def denoise(
        self,
        count: int,
        predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        num_inference_steps: int,
        generator: torch.Generator | list[torch.Generator] | None,
        eta: float,
        dtype: torch.dtype,
        output_type: str,
    ) -> ImagePipelineOutput:
        """``count`` images from noise: ``predict(latents, t)`` is the (guided) model output at each step."""
        side, channels = self.unet.config.sample_size, self.unet.config.out_channels
        latents = randn_tensor(
            (count, channels, side, side), generator=generator, device=self._execution_device, dtype=dtype
        )
        self.scheduler.set_timesteps(num_inference_steps)
        latents = latents * self.scheduler.init_noise_sigma
        extra = {"eta": eta} if "eta" in inspect.signature(self.scheduler.step).parameters else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            latents = self.scheduler.step(
                predict(self.scheduler.scale_model_input(latents, t), t), t, latents, **extra
            ).prev_sample
        image = (
            self.vqvae.decode(latents.to(self.vqvae.dtype) / self.vqvae.config.scaling_factor).sample / 2 + 0.5
        ).clamp(0, 1)
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()
        return ImagePipelineOutput(images=self.numpy_to_pil(image) if output_type == "pil" else image)
