"""Text-to-image generation in latent space with classifier-free guidance, on diffusers' samplers.

The unconditional branch is τθ of the empty caption's tokens, as training's caption dropout made it and as
LDMTextToImagePipeline computes it. Latents come back divided by ``scale_factor``, ready for the first
stage's decoder.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.configuration_utils import FrozenDict
from tqdm.auto import tqdm

from ldm.models.text_to_image import encode_text


def sampler(name: str, training_config: FrozenDict | dict):
    """``ddim`` or ``dpm++`` (DPM-Solver++ 2M) on the training noise schedule, with trailing timesteps (they
    reach t = T-1, where training's signal is nearly gone)."""
    if name == "ddim":
        return DDIMScheduler.from_config(training_config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(training_config, algorithm_type="dpmsolver++", timestep_spacing="trailing")
    raise ValueError(f"unknown sampler {name!r}; choose 'ddim' or 'dpm++'")


@torch.no_grad()
def generate(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    input_ids: torch.Tensor,
    unconditional_ids: torch.Tensor,
    scheduler,
    *,
    steps: int,
    guidance_scale: float,
    scale_factor: float,
    generator: torch.Generator,
    progress: bool = False,
) -> torch.Tensor:
    """Latents (first-stage scale) for each row of ``input_ids``, N x c x h x w."""
    device = input_ids.device
    config = unet.config
    shape = (input_ids.shape[0], config.in_channels, config.sample_size, config.sample_size)
    context = encode_text(text_encoder, input_ids)
    guided = guidance_scale != 1.0
    if guided:
        empty = encode_text(text_encoder, unconditional_ids.to(device)[None, :]).expand_as(context)
        context = torch.cat([empty, context])
    latents = torch.randn(shape, generator=generator, device=generator.device).to(device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        prediction = unet(model_input, t, encoder_hidden_states=context).sample.float()
        if guided:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        latents = scheduler.step(prediction, t, latents).prev_sample
    return latents / scale_factor
