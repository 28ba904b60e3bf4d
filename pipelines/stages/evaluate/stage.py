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
from omegaconf import DictConfig

from ldm.data.held_out import held_out_rows
from ldm.data.images import encode_png
from ldm.data.layouts import parse_layout
from ldm.grids import captioned_grid
from ldm.manifest import read_manifest
from ldm.metrics.adherence import describe
from ldm.storage import resolve
from ldm.tasks import task as named_task
from pipelines.driver.model_stage import load_model, model_inputs
from pipelines.driver.stage import Job, Output, Stage
from pipelines.stages.evaluate.metrics import FAMILIES, Context, Measured

# 2: the first stage's held-out rows from its manifest
STAGE = Stage("evaluate", version=2, output_url=lambda cfg: cfg.stage.output_url, uses_ray=False)
METRICS, GRID, PER_IMAGE = "metrics.json", "adherence.png", "adherence_per_image.json"


def run(cfg: DictConfig) -> dict[str, Any]:
    return STAGE.run(cfg, model_inputs, _evaluate)


def _evaluate(job: Job) -> Output:
    context = _context(job)
    metrics: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    for family in FAMILIES:
        if not family.applies(context.settings, context.task):
            continue
        outcome = family.measure(context)
        if isinstance(outcome, Measured):
            metrics.update(outcome.metrics)
            _log_drawn(job, outcome)
        else:
            skipped[family.name] = outcome.reason
    report = _report(job, context, metrics, skipped)
    return Output(
        facts={
            "layout": {"metrics": METRICS, "grid": GRID if set(metrics) - {"reconstruction", "fid"} else None},
            **report,
        },
        metrics={f"{group}/{name}": value for group, values in metrics.items() for name, value in values.items()},
        message=f"{STAGE.name}: {job.out}/{METRICS}",
    )


def _context(job: Job) -> Context:
    """The model, and prepare's held-out rows (which neither the first stage nor the diffusion model trained on),
    as many as the metrics use: their images, captions, classes and layouts."""
    storage, settings, trained = job.storage, job.settings, job.inputs.found["model"]
    task = named_task(trained["facts"].get("task", "text_to_image"))
    wanted = max(family.rows(settings, task) for family in FAMILIES)
    held_out, split = held_out_rows(storage, trained["inputs"]["latents"], wanted)
    if task.condition in ("label", "boxes"):  # only what the model can draw: a held-out row may name a new class
        held_out = _drawable(held_out, task.condition, set(trained["facts"]["classes"]))
    synthesized = settings.adherence.synthesized_url
    synthesized = read_manifest(storage, resolve(synthesized)) if synthesized else None
    pipeline = load_model(job, str(settings.device))
    return Context(settings, storage, pipeline, task, trained, held_out, split, synthesized)


def _drawable(held_out: dict[str, list[Any]], condition: str, known: set[str]) -> dict[str, list[Any]]:
    def classes(i: int) -> set[str]:
        if condition == "label":
            return {held_out["label"][i]}
        return {box["label"] for box in parse_layout(held_out["boxes"][i])}

    drawable = [i for i in range(len(held_out["key"])) if classes(i) <= known]
    return {column: [values[i] for i in drawable] for column, values in held_out.items()}


def _log_drawn(job: Job, measured: Measured) -> None:
    """The first 32 of the images a metric drew, captioned, to the output and the MLflow run; adherence's
    per-image table to the run."""
    if measured.per_image is not None:
        mlflow.log_table(measured.per_image, PER_IMAGE)
    if measured.images is None:
        return
    grid = captioned_grid(np.asarray(measured.images[:32]), measured.captions[:32], columns=8)
    fs, root = job.storage.fsspec(job.out)
    fs.pipe_file(f"{root}/{GRID}", encode_png(grid))
    mlflow.log_image(grid, GRID)


def _report(job: Job, context: Context, metrics: dict[str, Any], skipped: dict[str, str]) -> dict[str, Any]:
    """``metrics.json`` to the output and the run, and the numbers on the console."""
    settings = job.settings
    report = {
        "model": job.inputs.record["model"],
        "weights": str(settings.weights),
        "sampler": str(settings.sampler),
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "held_out": context.split,
        "metrics": metrics,
        "skipped": skipped,
    }
    fs, root = job.storage.fsspec(job.out)
    fs.pipe_file(f"{root}/{METRICS}", json.dumps(report, indent=2).encode())
    mlflow.log_dict(report, METRICS)
    for group, values in metrics.items():
        lines = describe(values) if group == "adherence" else [", ".join(f"{k} {v:.4g}" for k, v in values.items())]
        print(f"{STAGE.name}: {group}: " + "\n".join(lines))
    for group, why in skipped.items():
        print(f"{STAGE.name}: {group} skipped: {why}")
    return report
