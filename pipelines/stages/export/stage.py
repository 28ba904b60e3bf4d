"""stage=export: a train_ldm output as the diffusers pipeline directory of its task.

Text-to-image: ``LDMTextToImagePipeline`` (tokenizer, τθ as ``bert``, UNet, first stage, scheduler);
unconditional: ``LDMPipeline``, super-resolution: ``LDMSuperResolutionPipeline`` (UNet, first stage,
scheduler). The first stage is the ``vqvae``, its ``scaling_factor`` the latents' ``scale_factor`` (folded into
its decoder for super-resolution, whose pipeline does not divide by it). These load with
``DiffusionPipeline.from_pretrained(dir)`` without this project. Class-conditional, layout-to-image and
inpainting, for which diffusers has no pipeline: this project's ``ConditionedPipeline`` (UNet, class or layout
τθ as ``conditioner``, first stage, scheduler) or ``InpaintingPipeline`` directory, loaded with
``ConditionedPipeline.from_pretrained(dir)`` (``ldm.models.conditioners``) or
``InpaintingPipeline.from_pretrained(dir)`` (``ldm.models.image_conditioned``). A text-to-image directory is also logged
to the MLflow run as a pyfunc model (``pyfunc_model.py``: prompts in, PNGs out) and registered in the model registry.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from diffusers import LDMSuperResolutionPipeline, LDMTextToImagePipeline
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from omegaconf import DictConfig

from ldm.data.layouts import grid_layouts
from ldm.diffusion.sampling import pipeline_size
from ldm.models.conditioners import ConditionedPipeline, LayoutEncoder
from ldm.models.image_conditioned import InpaintingPipeline
from ldm.storage import Storage
from pipelines.driver.model_stage import load_model, model_inputs
from pipelines.driver.stage import Inputs, Job, Output, Stage

STAGE = Stage(
    "export", version=2, output_url=lambda cfg: cfg.stage.output_url, uses_ray=False
)  # 2: the manifest names the class to load with
# LDMTextToImagePipeline pads prompts to 77 tokens; τθ must have been trained on that length.
PIPELINE_MAX_LENGTH = 77
PYFUNC_MODEL = Path(__file__).resolve().with_name("pyfunc_model.py")
REQUIREMENTS = ("torch", "diffusers", "transformers", "tokenizers", "safetensors", "pandas", "Pillow")
# What the pyfunc model's predict takes and returns, given to MLflow: it cannot infer one from a DataFrame's type
# hints (and would say so on every export).
SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec("long", "seed", required=False),
            ColSpec("long", "steps", required=False),
            ColSpec("double", "guidance_scale", required=False),
        ]
    ),
    outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("binary", "png")]),
)
# MLflow serves it once as it logs the model, to check that the signature holds: one step is enough.
INPUT_EXAMPLE = pd.DataFrame(
    {"prompt": ["a red circle in the top left on a blue background"], "seed": [0], "steps": [1]}
)


def run(cfg: DictConfig) -> dict[str, Any]:
    return STAGE.run(cfg, _inputs, _export)


def _inputs(cfg: DictConfig, storage: Storage) -> Inputs:
    inputs = model_inputs(cfg, storage)
    max_length = inputs.found["model"]["facts"]["max_length"]
    if max_length is not None and max_length != PIPELINE_MAX_LENGTH:
        raise ValueError(
            f"{inputs.record['model']} was trained on captions of {max_length} tokens; "
            f"LDMTextToImagePipeline pads prompts to {PIPELINE_MAX_LENGTH}. "
            f"Prepare with stage.tokenizer.max_length={PIPELINE_MAX_LENGTH} to export."
        )
    return inputs


def _export(job: Job) -> Output:
    settings, out = job.settings, job.out
    pipeline = load_model(job, "cpu")  # saved, not run: no accelerator needed
    prompted = isinstance(pipeline, LDMTextToImagePipeline)
    resolution = pipeline.unet.config.sample_size * 2 ** (len(pipeline.vqvae.config.block_out_channels) - 1)
    registered = None
    with tempfile.TemporaryDirectory(prefix="export-") as local:
        pipeline.save_pretrained(local, safe_serialization=True)
        fs, root = job.storage.fsspec(out)
        fs.makedirs(root, exist_ok=True)
        for name in sorted(os.listdir(local), key=lambda n: n == "model_index.json"):  # the index last
            fs.put(os.path.join(local, name), f"{root}/{name}", recursive=True)
        if settings.log_model and prompted:
            logged = mlflow.pyfunc.log_model(
                name="pipeline",
                python_model=str(PYFUNC_MODEL),
                artifacts={"pipeline": local},
                pip_requirements=[f"{package}=={version(package)}" for package in REQUIREMENTS],
                registered_model_name=settings.registered_model,
                signature=SIGNATURE,
                input_example=INPUT_EXAMPLE,
            )
            if settings.registered_model:
                registered = {"name": settings.registered_model, "version": int(logged.registered_model_version)}
    where = f"; registered as {registered['name']} version {registered['version']}" if registered else ""
    size = pipeline_size(pipeline) if prompted else None  # the height / width its call takes
    if isinstance(pipeline, ConditionedPipeline):  # a class, or a layout of one box, as its call takes them
        classes = job.inputs.found["model"]["facts"]["classes"]
        example = (
            json.loads(grid_layouts(classes, 1)[0]) if isinstance(pipeline.conditioner, LayoutEncoder) else classes[0]
        )
    side = pipeline.unet.config.sample_size
    call = (
        f"(prompt, height={size}, width={size}, guidance_scale=4.0)"
        if prompted
        else f"([{example!r}], guidance_scale=4.0)"
        if isinstance(pipeline, ConditionedPipeline)
        else f"(image=<N x 3 x {side} x {side} tensor in [-1, 1]>)"
        if isinstance(pipeline, LDMSuperResolutionPipeline)
        else (
            f"(<N x {resolution} x {resolution} x 3 uint8 images>, "
            f"<N x {resolution} x {resolution} masks, 1 in the hole>)"
        )
        if isinstance(pipeline, InpaintingPipeline)
        else "(batch_size=4)"
    )
    # Diffusers' own pipelines load without this project; ours with their class, from this package.
    ours = type(pipeline).__module__.startswith("ldm.")
    loader = type(pipeline).__name__ if ours else "DiffusionPipeline"
    return Output(
        facts={
            "pipeline": type(pipeline).__name__,
            "load_with": f"{type(pipeline).__module__ if ours else 'diffusers'}.{loader}",
            "weights": str(settings.weights),
            "scheduler": type(pipeline.scheduler).__name__,
            **({"height": size, "width": size} if prompted else {}),
            "resolution": resolution,
            "registered_model": registered,
        },
        message=f"{STAGE.name}: {type(pipeline).__name__} at {out}{where}\n"
        f"        {loader}.from_pretrained({out!r}){call}",
    )
