"""stage=export: a train_ldm output as a diffusers ``LDMTextToImagePipeline`` directory.

Tokenizer, τθ (``bert``), UNet, first stage (``vqvae``, its ``scaling_factor`` the latents' ``scale_factor``)
and scheduler, loadable with ``DiffusionPipeline.from_pretrained(dir)`` without this project. The same
directory is logged to the MLflow run as a pyfunc model (``pipelines/mlflow_models/text_to_image.py``) and
registered in the model registry.
"""

from __future__ import annotations

import os
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
from omegaconf import DictConfig

from ldm.diffusion.sampling import load_pipeline, pipeline_size
from ldm.manifest import verify, write_manifest
from ldm.storage import Storage, resolve
from pipelines.outputs import claim_or_skip, stage_fingerprint
from pipelines.tracking import stage_run

STAGE = "export"
VERSION = 1
# LDMTextToImagePipeline pads prompts to 77 tokens; τθ must have been trained on that length.
PIPELINE_MAX_LENGTH = 77
PYFUNC_MODEL = Path(__file__).resolve().parents[1] / "mlflow_models" / "text_to_image.py"
REQUIREMENTS = ("torch", "diffusers", "transformers", "tokenizers", "safetensors", "pandas", "Pillow")


def run(cfg: DictConfig) -> dict[str, Any]:
    storage = Storage.from_config(cfg.storage)
    settings = cfg.stage
    model_url = resolve(settings.model_url)
    trained = verify(storage, model_url, stage="train_ldm")
    if trained["facts"]["max_length"] != PIPELINE_MAX_LENGTH:
        raise ValueError(
            f"{model_url} was trained on captions of {trained['facts']['max_length']} tokens; LDMTextToImagePipeline pads "
            f"prompts to {PIPELINE_MAX_LENGTH}. Prepare with stage.tokenizer.max_length={PIPELINE_MAX_LENGTH} to export."
        )
    out = resolve(settings.output_url)
    identity = stage_fingerprint(cfg, VERSION, [trained["fingerprint"]])

    with stage_run(cfg, STAGE):
        done = claim_or_skip(cfg, storage, out, STAGE, identity)
        if done is not None:
            return done
        started = time.time()
        pipeline = load_pipeline(storage, model_url, weights=settings.weights, sampler_name=settings.sampler)
        size = pipeline_size(pipeline)
        registered = None
        with tempfile.TemporaryDirectory(prefix="export-") as local:
            pipeline.save_pretrained(local, safe_serialization=True)
            fs, root = storage.fsspec(out)
            fs.makedirs(root, exist_ok=True)
            for name in sorted(os.listdir(local), key=lambda n: n == "model_index.json"):  # the index last
                fs.put(os.path.join(local, name), f"{root}/{name}", recursive=True)
            if settings.log_model:
                logged = mlflow.pyfunc.log_model(
                    name="pipeline",
                    python_model=str(PYFUNC_MODEL),
                    artifacts={"pipeline": local},
                    pip_requirements=[f"{package}=={version(package)}" for package in REQUIREMENTS],
                    registered_model_name=settings.registered_model,
                )
                if settings.registered_model:
                    registered = {"name": settings.registered_model, "version": int(logged.registered_model_version)}
        elapsed = time.time() - started
        manifest = write_manifest(
            storage,
            out,
            stage=STAGE,
            fingerprint=identity,
            inputs={"model": model_url, "fingerprint": trained["fingerprint"]},
            timings={"seconds": round(elapsed, 3)},
            facts={"pipeline": type(pipeline).__name__, "weights": settings.weights, "scheduler": type(pipeline.scheduler).__name__,
                   "height": size, "width": size, "resolution": size // 8 * pipeline.vae_scale_factor, "registered_model": registered},
        )
        mlflow.log_dict(manifest, "export_manifest.json")
        where = f"; registered as {registered['name']} version {registered['version']}" if registered else ""
        print(f"{STAGE}: {type(pipeline).__name__} at {out}{where}\n"
              f"        DiffusionPipeline.from_pretrained({out!r})(prompt, height={size}, width={size}, guidance_scale=4.0)")
        return manifest

