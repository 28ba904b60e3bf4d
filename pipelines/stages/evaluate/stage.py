"""stage=evaluate: numbers to trust about a train_ldm output.

(a) The first stage's reconstruction PSNR / SSIM on prepared images it never trained on (the keys its
train_autoencoder manifest says were held out); (b) on synthetic data, prompt adherence (text-to-image): images
generated for (colour, shape, background) combinations that were never rendered, read back by the synthesizer's
classifier, accuracy per attribute against chance; the scene distribution (unconditional): how far the
generated scenes' attributes are from the data's (total variation) and the fraction holding one clean object;
or class accuracy (class-conditional): how often an image shows the class it was drawn for, against chance;
(c) FID / KID against held-out images when a feature extractor is
configured (nothing is downloaded). ``metrics.json`` and a grid of the adherence samples go to
``stage.output_url``; the metrics to the MLflow run.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
import numpy as np
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig
from transformers import AutoImageProcessor, AutoModel

from ldm.data.images import encode_png, normalise, square_crop
from ldm.diffusion.sampling import generate_images
from ldm.grids import captioned_grid
from ldm.manifest import data_files, read_manifest, verify
from ldm.metrics.adherence import adherence, describe, held_out_prompts, held_out_scenes
from ldm.metrics.distribution import frechet_distance, image_features, kernel_distance
from ldm.metrics.reconstruction import evaluate_reconstruction
from ldm.metrics.scenes import class_accuracy, scene_distribution
from ldm.storage import Storage, pretrained_directory, resolve
from ldm.synthetic.scene import parse_caption
from ldm.tasks import task as named_task
from pipelines.model_stage import load_model, model_inputs
from pipelines.stage import Job, Output, Stage

STAGE = Stage("evaluate", version=2, output_url=lambda cfg: cfg.stage.output_url, uses_ray=False)  # 2: the first stage's held-out rows from its manifest
METRICS, GRID, PER_IMAGE = "metrics.json", "adherence.png", "adherence_per_image.json"


def run(cfg: DictConfig) -> dict[str, Any]:
    return STAGE.run(cfg, model_inputs, _evaluate)


def _evaluate(job: Job) -> Output:
    storage, settings, out, trained = job.storage, job.settings, job.out, job.inputs.found["model"]
    pipeline = load_model(job, str(settings.device))
    condition = named_task(trained["facts"].get("task", "text_to_image")).condition
    prompted = condition == "caption"
    generate = lambda conditions, seeds: generate_images(  # noqa: E731
        pipeline, conditions, seeds, steps=settings.steps,
        guidance_scale=settings.guidance_scale, batch_size=settings.batch_size, progress=True,
    )
    resolution = trained["facts"]["resolution"]
    # Only reconstruction and FID look at images: prepare's held-out rows (which neither the first stage nor the
    # diffusion model trained on) are read for them alone, as many as they use.
    wanted = max(settings.reconstruction.images if settings.reconstruction.enabled else 0,
                 settings.fid.images if settings.fid.feature_extractor else 0,
                 settings.scenes.images if settings.scenes.enabled and condition is None else 0)
    held_out, split = _held_out_rows(storage, trained, wanted)
    metrics: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    fs, root = storage.fsspec(out)
    fs.makedirs(root, exist_ok=True)

    def log_grid(images: np.ndarray, captions: list[str]) -> None:
        """The first 32 of the images the metric drew, captioned, to the output and the MLflow run."""
        grid = captioned_grid(images[:32], captions[:32], columns=8)
        fs.pipe_file(f"{root}/{GRID}", encode_png(grid))
        mlflow.log_image(grid, GRID)

    if settings.reconstruction.enabled:
        images = held_out["image"][: settings.reconstruction.images]
        if images:
            pixels = np.stack([square_crop(data, resolution) for data in images])
            batches = (torch.from_numpy(normalise(pixels[i : i + 32])).to(pipeline.device) for i in range(0, len(pixels), 32))
            metrics["reconstruction"] = evaluate_reconstruction(pipeline.vqvae, batches, settings.reconstruction.scene_fidelity).as_dict()
        else:
            skipped["reconstruction"] = f"no prepared row is held out ({split}): raise stage.held_out.fraction of prepare"

    synthesized = read_manifest(storage, resolve(settings.adherence.synthesized_url)) if settings.adherence.synthesized_url else None
    synthetic = synthesized is not None and synthesized.get("stage") == "synthesize"
    if condition is None and settings.scenes.enabled:
        real = [scene for scene in map(parse_caption, held_out["caption"]) if scene is not None]
        if not synthetic or not real:
            skipped["scenes"] = ("scene distribution is measured on synthetic data only (stage.adherence.synthesized_url names "
                                 "its synthesize output), against captions of held-out rows")
        else:
            generated = generate(None, [settings.seed + i for i in range(settings.scenes.images)])
            metrics["scenes"] = scene_distribution(real, generated)
            log_grid(generated, [f"seed {settings.seed + i}" for i in range(len(generated))])
    if prompted and settings.adherence.enabled and synthetic:
        scenes = held_out_scenes(synthesized["facts"]["held_out"], settings.adherence.prompts, settings.seed)
        prompts = held_out_prompts(scenes, settings.adherence.seeds, settings.seed)
        texts = [p.text for p in prompts]
        generated = generate(texts, [p.seed for p in prompts])
        metrics["adherence"], per_image = adherence(prompts, generated)
        mlflow.log_table(per_image, PER_IMAGE)
        log_grid(generated, texts)
    elif prompted and settings.adherence.enabled:
        skipped["adherence"] = (f"stage.adherence.synthesized_url={settings.adherence.synthesized_url} is not a synthesize "
                                "output: prompt adherence is measured on synthetic data only")

    if condition == "label" and settings.classes.enabled:
        if synthetic:
            known = trained["facts"]["classes"]
            classes = [name for name in known for _ in range(settings.classes.images_per_class)]
            generated = generate(classes, [settings.seed + i for i in range(len(classes))])
            metrics["classes"] = class_accuracy(classes, generated, len(known))
            shown = slice(0, len(classes), settings.classes.images_per_class)  # one image of each class
            log_grid(generated[shown], classes[shown])
        else:
            skipped["classes"] = "class accuracy is read by the synthetic scenes' classifier: synthetic data only"

    if settings.fid.feature_extractor:
        count = min(settings.fid.images, len(held_out["image"]))
        if count < 2:
            skipped["fid"] = f"{count} held-out image(s): FID needs at least 2"
        else:
            real = np.stack([square_crop(data, resolution) for data in held_out["image"][:count]])
            # Each drawn for what its held-out image was: its caption or its class (the rows' columns of those names).
            fake = generate(held_out[condition][:count] if condition else None, [settings.seed + i for i in range(count)])
            model, processor = _feature_extractor(storage, settings.fid.feature_extractor)
            real_f, fake_f = image_features(model.to(pipeline.device), processor, real), image_features(model, processor, fake)
            kid, kid_std = kernel_distance(real_f, fake_f, subset_size=settings.fid.kid_subset_size)
            metrics["fid"] = {"fid": frechet_distance(real_f, fake_f), "kid": kid, "kid_std": kid_std, "images": count}
    else:
        skipped["fid"] = "stage.fid.feature_extractor is null: set it to a local (or s3://) vision model directory for FID / KID"

    report = {"model": job.inputs.record["model"], "weights": str(settings.weights), "sampler": str(settings.sampler),
              "steps": settings.steps, "guidance_scale": settings.guidance_scale, "held_out": split,
              "metrics": metrics, "skipped": skipped}
    fs.pipe_file(f"{root}/{METRICS}", json.dumps(report, indent=2).encode())
    mlflow.log_dict(report, METRICS)
    for group, values in metrics.items():
        lines = describe(values) if group == "adherence" else [", ".join(f"{k} {v:.4g}" for k, v in values.items())]
        print(f"{STAGE.name}: {group}: " + "\n".join(lines))
    for group, why in skipped.items():
        print(f"{STAGE.name}: {group} skipped: {why}")
    return Output(
        facts={"layout": {"metrics": METRICS, "grid": GRID if {"adherence", "scenes", "classes"} & set(metrics) else None}, **report},
        metrics={f"{group}/{name}": value for group, values in metrics.items() for name, value in values.items()},
        message=f"{STAGE.name}: {out}/{METRICS}",
    )


def _held_out_rows(storage: Storage, trained: dict[str, Any], limit: int) -> tuple[dict[str, list], dict[str, Any]]:
    """Key, caption and image bytes of the first ``limit`` of prepare's held-out rows, found through the model's
    manifest chain (train_ldm -> encode_latents -> prepare) and read a batch at a time, and how they were
    chosen (prepare's ``held_out`` fact)."""
    rows: dict[str, list] = {"key": [], "caption": [], "label": [], "image": []}
    latents = verify(storage, trained["inputs"]["latents"], stage="encode_latents")
    prepared_url = latents["inputs"]["prepared"]
    prepared = verify(storage, prepared_url, stage="prepare")
    split = prepared["facts"].get("held_out") or {"fraction": 0.0, "rows": 0}
    for shard in data_files(prepared, prepared_url, "held_out"):
        fs, path = storage.pyarrow(shard)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=list(rows)):
                for name in rows:
                    rows[name] += batch[name].to_pylist()[: limit - len(rows[name])]
                if len(rows["key"]) >= limit:
                    return rows, split
    return rows, split


def _feature_extractor(storage: Storage, location: str):
    """A vision model and its image processor: hub id, local directory or s3:// (fetched), one path."""
    with pretrained_directory(location, storage) as local:
        return AutoModel.from_pretrained(local).eval(), AutoImageProcessor.from_pretrained(local)
