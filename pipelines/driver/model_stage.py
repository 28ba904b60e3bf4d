"""What stage=sample, stage=evaluate and stage=export share: a train_ldm output in, checked before anything
starts, and loaded as diffusers' ``LDMTextToImagePipeline``. They run in the driver, without Ray."""

from __future__ import annotations

import numpy as np
from diffusers import LDMTextToImagePipeline
from omegaconf import DictConfig

from ldm.diffusion.sampling import generate_images, load_pipeline
from ldm.storage import Storage
from pipelines.driver.stage import Inputs, Job


def model_inputs(cfg: DictConfig, storage: Storage) -> Inputs:
    """The train_ldm output at ``stage.model_url``; its manifest is ``found["model"]``."""
    return Inputs.output_of("train_ldm", cfg.stage.model_url, storage, "model")


def load_model(job: Job, device: str) -> LDMTextToImagePipeline:
    """The model as a pipeline with the stage's weights (ema | raw) and sampler, on ``device`` (auto: a GPU if
    there is one)."""
    settings = job.settings
    return load_pipeline(
        job.storage,
        job.inputs.record["model"],
        weights=str(settings.weights),
        sampler_name=str(settings.sampler),
        device=device,
    )


def generate(pipeline: LDMTextToImagePipeline, settings: DictConfig, conditions, seeds: list[int]) -> np.ndarray:
    """Images for ``conditions`` (prompts, classes, layouts, images, or None) and ``seeds`` with a generating stage's
    sampler settings (``stage.steps``, ``guidance_scale``, ``batch_size``), a progress bar over the batches."""
    return generate_images(
        pipeline,
        conditions,
        seeds,
        steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        batch_size=settings.batch_size,
        progress=True,
    )
