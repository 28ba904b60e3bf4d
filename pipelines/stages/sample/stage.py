"""stage=sample: images from a train_ldm output, with DDIM or DPM-Solver++, as its task draws them: for
prompts (text-to-image) or class names (class-conditional), guided; or (unconditional) ``stage.num_images``.

Each image is drawn from noise seeded ``stage.seed + i`` (i its place in prompt order), so one image can be
made again on its own, here or with the exported pipeline. The PNGs, a ``samples.jsonl`` index (file, prompt,
seed) and a captioned grid go to ``stage.output_url`` and to the MLflow run.
"""

from __future__ import annotations

import json
import tempfile
import time
from typing import Any

import mlflow
import numpy as np
from omegaconf import DictConfig

from ldm.data.images import encode_png
from ldm.diffusion.sampling import generate_images
from ldm.grids import captioned_grid
from ldm.storage import Storage, resolve
from ldm.tasks import task as named_task
from pipelines.config import plain
from pipelines.model_stage import load_model, model_inputs
from pipelines.stage import Inputs, Job, Output, Stage

STAGE = Stage("sample", version=1, output_url=lambda cfg: cfg.stage.output_url, uses_ray=False, detail="{images} images")
IMAGES, INDEX, GRID = "images", "samples.jsonl", "grid.png"


def run(cfg: DictConfig) -> dict[str, Any]:
    return STAGE.run(cfg, _inputs, _sample)


def _inputs(cfg: DictConfig, storage: Storage) -> Inputs:
    inputs = model_inputs(cfg, storage)
    facts = inputs.found["model"]["facts"]
    condition = named_task(facts.get("task", "text_to_image")).condition
    if condition == "caption":
        inputs.found["prompts"] = read_prompts(storage, plain(cfg.stage.prompts), cfg.stage.prompts_file)
    elif condition == "label":
        inputs.found["prompts"] = read_classes(plain(cfg.stage.classes), facts["classes"])
    else:
        inputs.found["prompts"] = None
    return inputs


def _sample(job: Job) -> Output:
    settings, out, prompts = job.settings, job.out, job.inputs.found["prompts"]
    started = time.time()
    rows = [prompt for prompt in prompts for _ in range(settings.images_per_prompt)] if prompts is not None else None
    seeds = [settings.seed + i for i in range(len(rows) if rows is not None else settings.num_images)]
    images = generate_images(load_model(job, str(settings.device)), rows, seeds, steps=settings.steps,
                             guidance_scale=settings.guidance_scale, batch_size=settings.batch_size, progress=True)
    elapsed = time.time() - started
    labels = rows if rows is not None else [f"seed {seed}" for seed in seeds]
    index = [{"file": f"{IMAGES}/{i:05d}.png", "prompt": rows[i] if rows is not None else None, "seed": seed} for i, seed in enumerate(seeds)]
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
        facts={"layout": {"images": f"{IMAGES}/", "index": INDEX, "grid": GRID}, "weights": str(settings.weights),
               "sampler": str(settings.sampler), "steps": settings.steps, "guidance_scale": settings.guidance_scale,
               "resolution": int(images.shape[1])},
        metrics={"images": len(seeds), "images_per_s": rate},
        message=f"{STAGE.name}: {len(seeds)} images" + (f" for {len(prompts)} prompt(s)" if prompts is not None else "")
                + f" in {elapsed:.1f}s; at {out} (grid: {out}/{GRID})",
    )


def read_classes(classes: list[str], known: list[str]) -> list[str]:
    """``classes`` (empty: every class the model knows), each one the model knows."""
    unknown = sorted(set(classes) - set(known))
    if unknown:
        raise ValueError(f"stage.classes: the model knows no class {unknown}; it knows {known}")
    return [str(c) for c in classes] or list(known)


def read_prompts(storage: Storage, prompts: list[str], prompts_file: str | None) -> list[str]:
    """``prompts``, then the non-empty lines of ``prompts_file``; at least one."""
    if prompts_file:
        fs, path = storage.fsspec(resolve(prompts_file))
        if not fs.exists(path):
            raise FileNotFoundError(f"stage.prompts_file={prompts_file}: no such file")
        with fs.open(path, "r") as f:
            prompts = prompts + [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give stage.prompts='[a red circle in the top left on a blue background]' or "
                         "stage.prompts_file=<a text file, one prompt per line>")
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
