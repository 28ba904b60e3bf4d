"""stage=evaluate: numbers to trust about a train_ldm output.

(a) The first stage's reconstruction PSNR / SSIM on prepared images it never trained on (the keys its
train_autoencoder manifest says were held out); (b) on synthetic data, prompt adherence (text-to-image): images
generated for (colour, shape, background) combinations that were never rendered, read back by the synthesizer's
classifier, accuracy per attribute against chance; the scene distribution (unconditional): how far the
generated scenes' attributes are from the data's (total variation) and the fraction holding one clean object;
class accuracy (class-conditional): how often an image shows the class it was drawn for, against chance; or
layout accuracy (layout-to-image): box IoU, position and class of the object drawn for a held-out row's layout,
against the same measures between layouts; (c) on any data, restoration of held-out images: super-resolution's
PSNR / SSIM beside bicubic upsampling, inpainting's PSNR in the hole beside the surrounding mean fill and
outside it; (d) FID / KID against held-out images when a feature extractor is configured (nothing is
downloaded). ``metrics.json`` and a grid of the task metric's samples go to ``stage.output_url``; the
metrics to the MLflow run.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
import numpy as np
import torch
from omegaconf import DictConfig
from transformers import AutoImageProcessor, AutoModel

from ldm.data.held_out import crops, held_out_rows, training_captions
from ldm.data.images import encode_png, normalise
from ldm.data.layouts import parse_layout
from ldm.diffusion.sampling import condition_captions, generate_images
from ldm.grids import captioned_grid
from ldm.manifest import read_manifest
from ldm.metrics.adherence import adherence, describe, held_out_prompts, held_out_scenes
from ldm.metrics.distribution import frechet_distance, image_features, kernel_distance
from ldm.metrics.reconstruction import evaluate_reconstruction
from ldm.metrics.restoration import inpainting_scores, super_resolution_scores
from ldm.metrics.scenes import class_accuracy, layout_accuracy, scene_distribution
from ldm.models.first_stage import load_first_stage
from ldm.models.image_conditioned import image_conditions
from ldm.storage import Storage, pretrained_directory, resolve
from ldm.synthetic.scene import parse_caption
from ldm.tasks import task as named_task
from pipelines.driver.model_stage import load_model, model_inputs
from pipelines.driver.stage import Job, Output, Stage

STAGE = Stage(
    "evaluate", version=2, output_url=lambda cfg: cfg.stage.output_url, uses_ray=False
)  # 2: the first stage's held-out rows from its manifest
METRICS, GRID, PER_IMAGE = "metrics.json", "adherence.png", "adherence_per_image.json"


def run(cfg: DictConfig) -> dict[str, Any]:
    return STAGE.run(cfg, model_inputs, _evaluate)


def _evaluate(job: Job) -> Output:
    storage, settings, out, trained = job.storage, job.settings, job.out, job.inputs.found["model"]
    pipeline = load_model(job, str(settings.device))
    task = named_task(trained["facts"].get("task", "text_to_image"))
    condition, prompted = task.condition, task.condition == "caption"
    generate = lambda conditions, seeds: generate_images(  # noqa: E731
        pipeline,
        conditions,
        seeds,
        steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        batch_size=settings.batch_size,
        progress=True,
    )
    resolution = trained["facts"]["resolution"]
    # Prepare's held-out rows (which neither the first stage nor the diffusion model trained on), as many as the
    # metrics use: their images, captions, classes and layouts.
    wanted = max(
        settings.reconstruction.images if settings.reconstruction.enabled else 0,
        settings.fid.images if settings.fid.feature_extractor else 0,
        settings.layouts.images if settings.layouts.enabled and condition == "boxes" else 0,
        settings.restoration.images if settings.restoration.enabled and task.concat else 0,
    )
    held_out, split = held_out_rows(storage, trained["inputs"]["latents"], wanted)
    if condition in (
        "label",
        "boxes",
    ):  # only what the model can draw: held-out rows may name a class no training row did
        known = set(trained["facts"]["classes"])
        names = lambda i: (
            {held_out["label"][i]} if condition == "label" else {b["label"] for b in parse_layout(held_out["boxes"][i])}
        )  # noqa: E731
        drawable = [i for i in range(len(held_out["key"])) if names(i) <= known]
        held_out = {column: [values[i] for i in drawable] for column, values in held_out.items()}
    metrics: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    fs, root = storage.fsspec(out)
    fs.makedirs(root, exist_ok=True)

    def originals(count: int) -> np.ndarray:
        return crops(held_out["image"][:count], resolution)

    def drawn_for(count: int) -> list[Any] | None:
        """What the first ``count`` held-out rows' images are drawn for: their caption, class or layout, their
        low-resolution or masked image, or nothing."""
        if task.concat:
            return image_conditions(
                task.concat, originals(count), held_out["key"][:count], trained["facts"]["latent_shape"][1]
            )
        return held_out[condition][:count] if condition else None

    def log_grid(images: np.ndarray, captions: list[str]) -> None:
        """The first 32 of the images the metric drew, captioned, to the output and the MLflow run."""
        grid = captioned_grid(images[:32], captions[:32], columns=8)
        fs.pipe_file(f"{root}/{GRID}", encode_png(grid))
        mlflow.log_image(grid, GRID)

    if settings.reconstruction.enabled:
        images = held_out["image"][: settings.reconstruction.images]
        if images:
            pixels = crops(images, resolution)
            batches = (
                torch.from_numpy(normalise(pixels[i : i + 32])).to(pipeline.device) for i in range(0, len(pixels), 32)
            )
            # The first stage as the latents were made with it (a super-resolution pipeline's has the scale folded in).
            first = trained["facts"]["first_stage"]
            first_stage = load_first_stage(first["location"], storage, first.get("subfolder")).to(pipeline.device)
            metrics["reconstruction"] = evaluate_reconstruction(
                first_stage, batches, settings.reconstruction.scene_fidelity
            ).as_dict()
        else:
            skipped["reconstruction"] = (
                f"no prepared row is held out ({split}): raise stage.held_out.fraction of prepare"
            )

    synthesized = (
        read_manifest(storage, resolve(settings.adherence.synthesized_url))
        if settings.adherence.synthesized_url
        else None
    )
    synthetic = synthesized is not None and synthesized.get("stage") == "synthesize"
    if condition is None and task.concat is None and settings.scenes.enabled:
        # The training data's scenes, as many as are generated: fewer would add their own sampling noise to the distance.
        captions = training_captions(storage, trained["inputs"]["latents"], settings.scenes.images) if synthetic else []
        real = [scene for scene in map(parse_caption, captions) if scene is not None]
        if not real:
            skipped["scenes"] = (
                "scene distribution is measured on synthetic data only (stage.adherence.synthesized_url names "
                "its synthesize output), against the training rows' captions"
            )
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
        skipped["adherence"] = (
            f"stage.adherence.synthesized_url={settings.adherence.synthesized_url} is not a synthesize "
            "output: prompt adherence is measured on synthetic data only"
        )

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

    if condition == "boxes" and settings.layouts.enabled:
        layouts = [boxes for boxes in held_out["boxes"] if parse_layout(boxes)][: settings.layouts.images]
        if not synthetic or len(layouts) < 2:
            skipped["layouts"] = (
                "layout accuracy is read by the synthetic scenes' classifier: synthetic data only, for the layouts "
                f"of held-out rows ({len(layouts)} found)"
            )
        else:
            generated = generate(layouts, [settings.seed + i for i in range(len(layouts))])
            metrics["layouts"] = layout_accuracy(layouts, generated)
            log_grid(generated, condition_captions(pipeline, layouts, []))

    if task.concat and settings.restoration.enabled:
        count = min(settings.restoration.images, len(held_out["image"]))
        if count == 0:
            skipped["restoration"] = f"no prepared row is held out ({split}): raise stage.held_out.fraction of prepare"
        else:
            inputs, real = drawn_for(count), originals(count)
            generated = generate(inputs, [settings.seed + i for i in range(count)])
            if task.concat == "low_res":
                metrics["super_resolution"] = super_resolution_scores(real, generated, np.stack(inputs))
            else:
                metrics["inpainting"] = inpainting_scores(real, generated, np.stack([mask for _, mask in inputs]))
            log_grid(generated, held_out["key"][:count])

    if settings.fid.feature_extractor:
        count = min(settings.fid.images, len(held_out["image"]))
        if count < 2:
            skipped["fid"] = f"{count} held-out image(s): FID needs at least 2"
        else:
            real = originals(count)
            fake = generate(
                drawn_for(count), [settings.seed + i for i in range(count)]
            )  # each for what its held-out image was
            model, processor = _feature_extractor(storage, settings.fid.feature_extractor)
            real_f, fake_f = (
                image_features(model.to(pipeline.device), processor, real),
                image_features(model, processor, fake),
            )
            kid, kid_std = kernel_distance(real_f, fake_f, subset_size=settings.fid.kid_subset_size)
            metrics["fid"] = {"fid": frechet_distance(real_f, fake_f), "kid": kid, "kid_std": kid_std, "images": count}
    else:
        skipped["fid"] = (
            "stage.fid.feature_extractor is null: set it to a local (or s3://) vision model directory for FID / KID"
        )

    report = {
        "model": job.inputs.record["model"],
        "weights": str(settings.weights),
        "sampler": str(settings.sampler),
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "held_out": split,
        "metrics": metrics,
        "skipped": skipped,
    }
    fs.pipe_file(f"{root}/{METRICS}", json.dumps(report, indent=2).encode())
    mlflow.log_dict(report, METRICS)
    for group, values in metrics.items():
        lines = describe(values) if group == "adherence" else [", ".join(f"{k} {v:.4g}" for k, v in values.items())]
        print(f"{STAGE.name}: {group}: " + "\n".join(lines))
    for group, why in skipped.items():
        print(f"{STAGE.name}: {group} skipped: {why}")
    return Output(
        facts={
            "layout": {"metrics": METRICS, "grid": GRID if set(metrics) - {"reconstruction", "fid"} else None},
            **report,
        },
        metrics={f"{group}/{name}": value for group, values in metrics.items() for name, value in values.items()},
        message=f"{STAGE.name}: {out}/{METRICS}",
    )


def _feature_extractor(storage: Storage, location: str):
    """A vision model and its image processor: hub id, local directory or s3:// (fetched), one path."""
    with pretrained_directory(location, storage) as local:
        return AutoModel.from_pretrained(local).eval(), AutoImageProcessor.from_pretrained(local)
