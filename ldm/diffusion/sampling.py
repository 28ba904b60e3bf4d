"""Generation through each task's pipeline: diffusers' own ``LDMTextToImagePipeline`` (text-to-image, with
classifier-free guidance), ``LDMPipeline`` (unconditional) and ``LDMSuperResolutionPipeline``, and where
diffusers has none ``ConditionedPipeline`` (class labels or layouts, guided against the null condition) and
``InpaintingPipeline``.

A task's pipeline is its one generation path: training's validation grids, stage=sample, stage=evaluate and the
exported model all run it, so an exported directory reproduces what the stages showed. The text-to-image
pipeline's unconditional branch is τθ of the empty prompt, as training's caption dropout made it. The
pipelines divide latents by the first stage's ``scaling_factor``, which is set to the manifest's
``scale_factor`` here; ``LDMSuperResolutionPipeline`` does not, so its first stage has 1 / scale_factor folded in.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    LDMPipeline,
    LDMSuperResolutionPipeline,
    LDMTextToImagePipeline,
)
from diffusers.configuration_utils import FrozenDict
from tqdm.auto import tqdm

from ldm.choices import SAMPLERS, WEIGHTS
from ldm.data.layouts import describe_layout
from ldm.devices import device_for, enable_tf32
from ldm.manifest import verify
from ldm.models.conditioners import ConditionedPipeline, LayoutEncoder, LearnedConditioner
from ldm.models.first_stage import FirstStage, load_first_stage
from ldm.models.image_conditioned import InpaintingPipeline, image_tensor, unscaled_first_stage
from ldm.models.text_to_image import load_models
from ldm.storage import Storage
from ldm.tasks import task as named_task
from ldm.text.tokenizer import load_tokenizer


def sampler(name: str, training_config: FrozenDict | dict):
    """``ddim`` or ``dpm++`` (DPM-Solver++ 2M) on the training noise schedule, with trailing timesteps (they
    reach t = T-1, where training's signal is nearly gone)."""
    if name == "ddim":
        return DDIMScheduler.from_config(
            training_config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False
        )
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(
            training_config, algorithm_type="dpmsolver++", timestep_spacing="trailing"
        )
    raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")


def task_pipeline(
    unet: torch.nn.Module,
    conditioner: torch.nn.Module | None,
    tokenizer,
    first_stage: FirstStage,
    scale_factor: float,
    scheduler,
    concat: str | None = None,
) -> DiffusionPipeline:
    """The models as their task's pipeline: by what is concatenated to z_t (``concat``: the low-resolution
    image, ``LDMSuperResolutionPipeline``, whose first stage decodes scaled latents; the mask and masked
    latent, ``InpaintingPipeline``), else by τθ: none (unconditional: ``LDMPipeline``), a class or layout
    conditioner (``ConditionedPipeline``) or a text encoder (``LDMTextToImagePipeline``, with ``tokenizer``).
    ``first_stage`` gets ``scale_factor`` as its ``scaling_factor``."""
    first_stage.register_to_config(scaling_factor=float(scale_factor))
    if concat == "low_res":
        pipeline = LDMSuperResolutionPipeline(
            vqvae=unscaled_first_stage(first_stage, scale_factor), unet=unet, scheduler=scheduler
        )
    elif concat == "masked":
        pipeline = InpaintingPipeline(vqvae=first_stage, unet=unet, scheduler=scheduler)
    elif conditioner is None:
        pipeline = LDMPipeline(vqvae=first_stage, unet=unet, scheduler=scheduler)
    elif isinstance(conditioner, LearnedConditioner):
        pipeline = ConditionedPipeline(vqvae=first_stage, unet=unet, conditioner=conditioner, scheduler=scheduler)
    else:
        pipeline = LDMTextToImagePipeline(
            vqvae=first_stage, bert=conditioner, tokenizer=tokenizer, unet=unet, scheduler=scheduler
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_pipeline(
    storage: Storage, url: str, *, weights: str = "ema", sampler_name: str = "ddim", device: str = "cpu"
) -> DiffusionPipeline:
    """The pipeline of a train_ldm output (its manifest is checked), as its task samples: its EMA or raw
    weights, its tokenizer (text-to-image), the first stage it trained on, and the sampler on its training noise
    schedule. ``device`` auto: a GPU if there is one."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: choose 'ema' (the averaged weights) or 'raw' (the last step's)")
    facts = verify(storage, url, stage="train_ldm")["facts"]
    layout = facts["layout"]
    with ExitStack() as fetched:
        local = lambda folder: fetched.enter_context(storage.local_directory(f"{url}/{folder.strip('/')}"))  # noqa: E731
        unet, text_encoder = load_models(local(layout["ema"]) if weights == "ema" else local(""))
        tokenizer = load_tokenizer(local(layout["tokenizer"])) if "tokenizer" in layout else None
        schedule = DDPMScheduler.load_config(local(layout["scheduler"]))
    first = facts["first_stage"]
    first_stage = load_first_stage(first["location"], storage, first.get("subfolder"))
    pipeline = task_pipeline(
        unet,
        text_encoder,
        tokenizer,
        first_stage,
        facts["scale_factor"],
        sampler(sampler_name, schedule),
        named_task(facts.get("task", "text_to_image")).concat,
    )
    target = device_for(device)
    enable_tf32(target)
    return pipeline.to(target)


def pipeline_size(pipeline: LDMTextToImagePipeline) -> int:
    """The ``height`` / ``width`` to call a text-to-image pipeline with. It assumes a first stage of factor 8
    when it sizes the latents (``height // 8``), so this is 8 x the UNet's latent size, whatever the first
    stage's factor; the images come out at the first stage's own resolution."""
    return 8 * pipeline.unet.config.sample_size


@torch.no_grad()
def generate_images(
    pipeline: DiffusionPipeline,
    conditions: Sequence[Any] | None,
    seeds: Sequence[int],
    *,
    steps: int,
    guidance_scale: float,
    batch_size: int = 16,
    progress: bool = False,
) -> np.ndarray:
    """N x H x W x 3 uint8 images, image i from noise seeded ``seeds[i]`` alone, so that any one image is
    reproduced by ``pipeline(prompt, generator=torch.Generator().manual_seed(seed))`` (an unconditional one:
    ``pipeline(generator=...)``) whatever its batch. ``conditions``: one per seed (captions; class names or
    layouts for a ``ConditionedPipeline``; low-resolution images, N x h x w x 3 uint8, for super-resolution;
    (image, mask) pairs for inpainting), or None for an unconditional one. Guidance applies to the
    text, class and layout pipelines only."""
    if conditions is not None and len(conditions) != len(seeds):
        raise ValueError(f"{len(conditions)} conditions but {len(seeds)} seeds")
    if conditions is None and not isinstance(pipeline, LDMPipeline):
        raise ValueError(
            f"a {type(pipeline).__name__} draws for given conditions (prompts, classes, layouts or images); got none"
        )
    images = []
    for start in tqdm(range(0, len(seeds), batch_size), desc="sampling", unit="batch", disable=not progress):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds[chunk]]
        if isinstance(pipeline, LDMTextToImagePipeline):
            size = pipeline_size(pipeline)
            output = pipeline(
                list(conditions[chunk]),
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="np",
            )
        elif isinstance(pipeline, ConditionedPipeline):
            output = pipeline(
                list(conditions[chunk]),
                guidance_scale=guidance_scale,
                num_inference_steps=steps,
                generator=generators,
                output_type="np",
            )
        elif isinstance(pipeline, LDMSuperResolutionPipeline):
            output = pipeline(
                image_tensor(np.stack(conditions[chunk])),
                num_inference_steps=steps,
                generator=generators,
                output_type="np",
            )
        elif isinstance(pipeline, InpaintingPipeline):
            originals, masks = zip(*conditions[chunk])
            output = pipeline(
                np.stack(originals), np.stack(masks), num_inference_steps=steps, generator=generators, output_type="np"
            )
        else:
            output = pipeline(
                batch_size=len(generators), generator=generators, num_inference_steps=steps, output_type="np"
            )
        images.append(to_uint8(output.images))
    return np.concatenate(images) if images else np.zeros((0, 0, 0, 3), np.uint8)


def condition_captions(
    pipeline: DiffusionPipeline, conditions: Sequence[str] | None, seeds: Sequence[int]
) -> list[str]:
    """What to write under each image of a grid: its prompt or class, its layout described, or (no condition,
    or an image one) its seed."""
    if conditions is None or not all(isinstance(c, str) for c in conditions):
        return [f"seed {seed}" for seed in seeds]
    layouts = isinstance(getattr(pipeline, "conditioner", None), LayoutEncoder)
    return [describe_layout(c) if layouts else c for c in conditions]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """The pipeline's [0, 1] float images as it makes PIL images of them (``numpy_to_pil``)."""
    return (images * 255).round().astype(np.uint8)
