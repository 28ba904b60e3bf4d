"""stage=sample: images from a train_ldm output, with DDIM or DPM-Solver++, as its task draws them: for
prompts (text-to-image), class names (class-conditional) or layouts (layout-to-image), guided; for images
(super-resolution: their low-resolution versions; inpainting: with random holes, or ``stage.masks``), ``stage.images``
or else held-out ones; or (unconditional) ``stage.num_images``.

Each image is drawn from noise seeded ``stage.seed + i`` (i its place in prompt order), so one image can be
made again on its own, here or with the exported pipeline. The PNGs, a ``samples.jsonl`` index (file, prompt
or input image, seed) and a captioned grid go to ``stage.output_url`` and to the MLflow run.
"""

from __future__ import annotations

import json
import tempfile
import time
from typing import Any

import mlflow
import numpy as np
from omegaconf import DictConfig

from ldm.data.held_out import crops, held_out_crops
from ldm.data.images import encode_png
from ldm.data.layouts import grid_layouts, parse_layout
from ldm.diffusion.sampling import condition_captions
from ldm.grids import captioned_grid
from ldm.models.image_conditioned import image_conditions
from ldm.storage import Storage, resolve
from ldm.tasks import Task
from ldm.tasks import task as named_task
from pipelines.driver.config import plain
from pipelines.driver.model_stage import generate, load_model, model_inputs
from pipelines.driver.stage import Inputs, Job, Output, Stage

STAGE = Stage(
    "sample", version=1, output_url=lambda cfg: cfg.stage.output_url, uses_ray=False, detail="{images} images"
)
IMAGES, INDEX, GRID = "images", "samples.jsonl", "grid.png"


def run(cfg: DictConfig) -> dict[str, Any]:
    return STAGE.run(cfg, _inputs, _sample)


def _inputs(cfg: DictConfig, storage: Storage) -> Inputs:
    inputs = model_inputs(cfg, storage)
    model = inputs.found["model"]
    facts = model["facts"]
    task = named_task(facts.get("task", "text_to_image"))
    labels, masks = None, read_masks(storage, plain(cfg.stage.masks), task, len(cfg.stage.images), facts["resolution"])
    if task.condition == "caption":
        prompts = read_prompts(storage, plain(cfg.stage.prompts), cfg.stage.prompts_file)
    elif task.condition == "label":
        prompts = read_classes(plain(cfg.stage.classes), facts["classes"])
    elif task.condition == "boxes":
        prompts = read_layouts(plain(cfg.stage.layouts), facts["classes"], cfg.stage.num_images)
    elif task.concat and cfg.stage.images:  # a user's low-resolution images as they are, or images to fill
        side = facts["latent_shape"][1] if task.concat == "low_res" else facts["resolution"]
        labels, pixels = read_images(storage, plain(cfg.stage.images), side)
        prompts = (
            list(pixels) if task.concat == "low_res" else image_conditions(task.concat, pixels, labels, side, masks)
        )
    elif task.concat:  # held-out images, downsampled or masked as training's were
        labels, pixels = held_out_crops(storage, model["inputs"]["latents"], cfg.stage.num_images, facts["resolution"])
        if not labels:
            raise ValueError(
                f"the model's data ({model['inputs']['latents']}) has no held-out rows to sample from: "
                "give stage.images=[<image files>]"
            )
        prompts = image_conditions(task.concat, pixels, labels, facts["latent_shape"][1])
    else:
        prompts = None
    inputs.found.update(prompts=prompts, labels=labels, masks=plain(cfg.stage.masks) if masks is not None else None)
    return inputs


def _sample(job: Job) -> Output:
    settings, out, prompts = job.settings, job.out, job.inputs.found["prompts"]
    started = time.time()

    def repeat(items):
        return [item for item in items for _ in range(settings.images_per_prompt)] if items is not None else None

    rows, named, masks = repeat(prompts), repeat(job.inputs.found["labels"]), repeat(job.inputs.found["masks"])
    seeds = [settings.seed + i for i in range(len(rows) if rows is not None else settings.num_images)]
    pipeline = load_model(job, str(settings.device))
    images = generate(pipeline, settings, rows, seeds)
    elapsed = time.time() - started
    labels = named or condition_captions(pipeline, rows, seeds)
    # What each image was drawn for: its prompt (a caption, class or layout), or the image it upsamples or fills.
    drawn_for = (
        [{"input": name, **({"mask": masks[i]} if masks else {})} for i, name in enumerate(named)]
        if named
        else [{"prompt": rows[i] if rows is not None else None} for i in range(len(seeds))]
    )
    index = [{"file": f"{IMAGES}/{i:05d}.png", **drawn_for[i], "seed": seed} for i, seed in enumerate(seeds)]
    grid = captioned_grid(images, labels, columns=settings.grid_columns)
    files = sample_files(images, index)
    write_files(job.storage, out, {**files, GRID: encode_png(grid)})
    mlflow.log_image(grid, GRID)
    with tempfile.TemporaryDirectory(prefix="samples-") as local:
        write_files(Storage(root=local), local, files)
        mlflow.log_artifacts(local, "samples")
    rate = len(seeds) / max(elapsed, 1e-9)
    return Output(
        counts={"images": len(seeds), "prompts": len(prompts) if prompts is not None else 0},
        timings={"images_per_s": round(rate, 3)},
        facts={
            "layout": {"images": f"{IMAGES}/", "index": INDEX, "grid": GRID},
            "weights": str(settings.weights),
            "sampler": str(settings.sampler),
            "steps": settings.steps,
            "guidance_scale": settings.guidance_scale,
            "resolution": int(images.shape[1]),
        },
        metrics={"images": len(seeds), "images_per_s": rate},
        message=f"{STAGE.name}: {len(seeds)} images"
        + (f" for {len(prompts)} prompt(s)" if prompts is not None else "")
        + f" in {elapsed:.1f}s; at {out} (grid: {out}/{GRID})",
    )


def read_images(
    storage: Storage, images: list[str], side: int, setting: str = "stage.images"
) -> tuple[list[str], np.ndarray]:
    """``images`` (files, local or s3://) and their ``side`` x ``side`` center crops."""
    data = []
    for url in images:
        fs, path = storage.fsspec(resolve(url))
        if not fs.exists(path):
            raise FileNotFoundError(f"{setting}: no such file {url}")
        data.append(fs.cat_file(path))
    try:
        return [str(url) for url in images], crops(data, side)
    except Exception as e:  # PIL raises many kinds on bad bytes
        raise ValueError(f"{setting}: an image does not decode ({e})") from None


def read_masks(storage: Storage, masks: list[str], task: Task, images: int, side: int) -> np.ndarray | None:
    """An inpainting model's holes for ``stage.images``, one mask file each (light: the hole), cropped as the
    images are; none given: None (each image's hole is drawn from its name)."""
    if not masks:
        return None
    if task.concat != "masked":
        raise ValueError(f"stage.masks is for inpainting models; this model's task is {task.name}")
    if len(masks) != images:
        raise ValueError(f"stage.masks: {len(masks)} mask(s) for {images} image(s) in stage.images: expected one each")
    return (read_images(storage, masks, side, "stage.masks")[1].mean(axis=-1) >= 128).astype(np.uint8)


def read_classes(classes: list[str], known: list[str]) -> list[str]:
    """``classes`` (empty: every class the model knows), each one the model knows."""
    unknown = sorted(set(classes) - set(known))
    if unknown:
        raise ValueError(f"stage.classes: the model knows no class {unknown}; it knows {known}")
    return [str(c) for c in classes] or list(known)


def read_layouts(layouts: list[Any], known: list[str], count: int) -> list[str]:
    """``layouts`` as JSON text, each checked (a list of boxes of classes the model knows); empty: ``count``
    one-box layouts that put each class in each quadrant in turn."""
    texts = [layout if isinstance(layout, str) else json.dumps(layout) for layout in layouts]
    for i, text in enumerate(texts):
        try:
            unknown = sorted({box["label"] for box in parse_layout(text)} - set(known))
        except ValueError as e:
            raise ValueError(f"stage.layouts[{i}]: {e}") from None
        if unknown:
            raise ValueError(f"stage.layouts[{i}]: the model knows no class {unknown}; it knows {known}")
    return texts or grid_layouts(known, count)


def read_prompts(storage: Storage, prompts: list[str], prompts_file: str | None) -> list[str]:
    """``prompts``, then the non-empty lines of ``prompts_file``; at least one."""
    if prompts_file:
        fs, path = storage.fsspec(resolve(prompts_file))
        if not fs.exists(path):
            raise FileNotFoundError(f"stage.prompts_file={prompts_file}: no such file")
        with fs.open(path, "r") as f:
            prompts = prompts + [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(
            "no prompts: give stage.prompts='[a red circle in the top left on a blue background]' or "
            "stage.prompts_file=<a text file, one prompt per line>"
        )
    return [str(p) for p in prompts]


def sample_files(images: np.ndarray, index: list[dict[str, Any]]) -> dict[str, bytes]:
    """The PNGs and the ``samples.jsonl`` index, by their path in the output, encoded once."""
    files = {row["file"]: encode_png(image) for image, row in zip(images, index)}
    files[INDEX] = "".join(json.dumps(row) + "\n" for row in index).encode()
    return files


def write_files(storage: Storage, out: str, files: dict[str, bytes]) -> None:
    fs, root = storage.fsspec(out)
    fs.makedirs(f"{root}/{IMAGES}", exist_ok=True)
    for name, data in files.items():
        fs.pipe_file(f"{root}/{name}", data)
