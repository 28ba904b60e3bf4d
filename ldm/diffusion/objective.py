"""The denoising objective in latent space (the paper's Eq. 2, conditioned as Eq. 3).

z0 is drawn from the stored first-stage posterior and scaled by the manifest's ``scale_factor``; a timestep
t ~ U{0..T-1} and noise ε give z_t = √ᾱ_t z0 + √(1-ᾱ_t) ε; the UNet predicts ε (the paper), or v, from z_t,
t and τθ(y). Min-SNR-γ weighting (Hang et al., 2023) and caption dropout for classifier-free guidance are
options. The noise schedule is diffusers' scheduler config, so the samplers read the same one.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from ldm.choices import NOISE_SCHEDULES, PREDICTION_TYPES
from ldm.models.first_stage import Encoded
from ldm.models.text_to_image import encode_text


def noise_scheduler(
    schedule: str,
    prediction_type: str,
    timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    zero_terminal_snr: bool = False,
) -> DDPMScheduler:
    """The training noise schedule. ``zero_terminal_snr`` rescales it so that z_T holds no trace of z0 (Lin et
    al., 2024): LDM's linear schedule leaves √ᾱ_T = 0.068 of the image at t = T, enough on a small latent grid
    for the model to read where the object is from z_T itself. It then learns to place the object where the
    starting noise suggests, not where the prompt says. With no signal at t = T, an ε-prediction says nothing
    about z0 there, so it needs v-prediction."""
    if zero_terminal_snr and prediction_type != "v_prediction":
        raise ValueError(
            f"zero_terminal_snr needs prediction_type v_prediction, not {prediction_type!r}: at t = T an "
            "ε-prediction gives no estimate of the image"
        )
    if schedule not in NOISE_SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {sorted(NOISE_SCHEDULES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type is one of {PREDICTION_TYPES}, not {prediction_type!r}")
    return DDPMScheduler(
        num_train_timesteps=timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=NOISE_SCHEDULES[schedule],
        prediction_type=prediction_type,
        clip_sample=False,  # latents are not bounded like pixels
        rescale_betas_zero_snr=zero_terminal_snr,
    )


def sample_latents(
    columns: dict[str, torch.Tensor], scale_factor: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z0 ~ q(z|x) from stored moments (a fresh draw each time), or the VQ latent, times ``scale_factor``."""
    if "latent" in columns:
        return columns["latent"].float() * scale_factor
    posterior = Encoded(mean=columns["latent_mean"].float(), logvar=columns["latent_logvar"].float())
    return posterior.sample(generator) * scale_factor


def drop_captions(
    captions: torch.Tensor, unconditional: torch.Tensor, probability: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each caption (its tokens, or its precomputed τθ(y)) by the empty caption's with ``probability``:
    the unconditional model that classifier-free guidance needs, trained in the same network (Ho & Salimans,
    2022)."""
    if probability <= 0:
        return captions
    drop = torch.rand(captions.shape[0], generator=generator, device=captions.device) < probability
    return torch.where(drop.view(-1, *[1] * unconditional.dim()), unconditional.to(captions.device)[None], captions)


@dataclass
class DiffusionObjective:
    scheduler: DDPMScheduler
    snr_gamma: float | None = None  # min-SNR-γ loss weighting; None: the plain (paper's) MSE

    def loss(
        self,
        unet: torch.nn.Module,
        z0: torch.Tensor,
        context: torch.Tensor | None,
        generator: torch.Generator | None = None,
        concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean denoising loss of ``unet`` on the batch ``z0`` under ``context`` = τθ(y) (None: a UNet
        without cross-attention, which takes z_t and t alone), with ``concat`` (super-resolution's low-resolution
        image, inpainting's mask and masked latent) concatenated to z_t on the channels."""
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (z0.shape[0],), generator=generator, device=z0.device)
        noise = torch.randn(z0.shape, generator=generator, device=z0.device)
        noisy = self.scheduler.add_noise(z0, noise, t)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(z0, noise, t)
        else:
            target = noise
        if concat is not None:
            noisy = torch.cat([noisy, concat.to(noisy.dtype)], dim=1)
        prediction = (unet(noisy, t) if context is None else unet(noisy, t, encoder_hidden_states=context)).sample
        error = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.snr_gamma is not None:
            snr = compute_snr(self.scheduler, t)
            weight = torch.clamp(snr, max=self.snr_gamma) / snr
            if self.scheduler.config.prediction_type == "v_prediction":
                weight = torch.clamp(snr, max=self.snr_gamma) / (snr + 1)
            error = error * weight
        return error.mean()


class DenoisingLoss(torch.nn.Module):
    """UNet + τθ as one module, so DDP averages the gradients of both; forward is the objective. ``text_encoder``
    is None when the captions come as a frozen encoder's precomputed τθ(y), or when nothing conditions the UNet."""

    def __init__(
        self,
        unet: torch.nn.Module,
        text_encoder: torch.nn.Module | None,
        objective: DiffusionObjective,
        train_text_encoder: bool,
    ):
        super().__init__()
        self.unet, self.text_encoder, self.objective = unet, text_encoder, objective
        self.train_text_encoder = train_text_encoder

    def forward(
        self,
        z0: torch.Tensor,
        captions: torch.Tensor | None,
        generator: torch.Generator,
        concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``captions``: token ids, τθ(y) already computed (floating point; stored as float16), or None (no
        cross-attention); ``concat``: what the task concatenates to z_t, or None."""
        if captions is None:
            context = None
        elif captions.is_floating_point():
            context = captions.float()
        else:
            with nullcontext() if self.train_text_encoder else torch.no_grad():
                context = encode_text(self.text_encoder, captions)
        return self.objective.loss(self.unet, z0, context, generator, concat)
