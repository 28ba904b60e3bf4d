"""stage=train_ldm: the latent diffusion model of the chosen task (``task=``: text-to-image, unconditional,
class-conditional, layout-to-image, super-resolution, inpainting) on the precomputed latents, with Ray Train.

Each worker reads its run of every epoch's order of the latent shards (moments, and what the task conditions
on or concatenates: tokens or τθ(y), labels, boxes, low-resolution images, masks and masked latents) with Ray Data
(``EpochData``; the order is a function of the seed and the epoch), so a checkpoint holds the exact data
position; training never touches pixels. Checkpoints go to
``stage.checkpoints_url`` under a run name made from the training settings, so the same command after a kill
continues (``resume=latest``), and a dying worker restarts the group from the latest one
(``scaling.max_failures``). The final model (UNet, τθ, their EMA, tokenizer, noise schedule; the first stage by
reference) is written to ``stage.output_url`` with a manifest, and logged to the MLflow run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from functools import partial
from typing import Any

import mlflow
import ray
import ray.train
from omegaconf import DictConfig, OmegaConf
from pyarrow.fs import FileType
from safetensors.numpy import load

from ldm.data.held_out import held_out_crops
from ldm.latents import CONCAT, TEXT_EMBEDDING
from ldm.manifest import data_files, data_row_groups
from ldm.models.presets import describe, text_to_image_preset
from ldm.models.text_to_image import CONDITIONER, EMA, TEXT_ENCODER, UNET, load_text_encoder
from ldm.storage import Storage, model_location, resolve, weights_digest
from ldm.tasks import task as named_task
from ldm.text.tokenizer import load_tokenizer, save_tokenizer
from pipelines.driver import trainer as training
from pipelines.driver.stage import Inputs, Job, Output, Stage, task_identity
from pipelines.stages.train_ldm import loop
from pipelines.worker.checkpoint import STATE_FILE
from pipelines.worker.data import EpochData

# 2: tiny's τθ is a BertModel. 3: a class (or layout) τθ is saved in conditioner/.
STAGE = Stage(
    "train_ldm",
    version=3,
    output_url=lambda cfg: cfg.stage.output_url,
    uses_task=True,
    detail="{steps} steps",
    requests=lambda cfg: training.requests(cfg, 1),
)  # a latent read task: Ray Data's 1 CPU
SCHEDULER_DIR, TOKENIZER_DIR = "scheduler", "tokenizer"


def run(cfg: DictConfig) -> dict[str, Any]:
    return STAGE.run(cfg, _inputs, _train)


def _inputs(cfg: DictConfig, storage: Storage) -> Inputs:
    """The latents, and the checkpoint ``stage.resume`` names, if it names one: both part of the output's identity.
    The model's preset is resolved here too, so that a bad override fails before anything starts."""
    model = cfg.stage.model
    spec = text_to_image_preset(model.preset, model.unet, model.text_encoder)
    inputs = Inputs.output_of("encode_latents", cfg.stage.latents_url, storage, "latents")
    resume_from = _resume_from(cfg.stage.resume, storage)
    inputs.fingerprints.extend([resume_from.path] if resume_from else [])
    task = named_task(cfg.task.name)
    latent_facts = inputs.found["latents"]["facts"]
    if task.condition == "label" and not latent_facts.get("classes"):
        raise ValueError(
            f"task={task.name}: stage.latents_url={inputs.record['latents']} has no class labels. "
            "Name the data's class column (data.input.label_col) and run prepare and encode_latents again"
        )
    if latent_facts.get("concat") != task.concat:
        raise ValueError(
            f"task={task.name}: stage.latents_url={inputs.record['latents']} was encoded with "
            f"concat={latent_facts.get('concat')}, the task concatenates {task.concat} to z_t: "
            f"run stage=encode_latents task={task.name} (its output_url is "
            f"latents{cfg.task.latents_suffix} by default)"
        )
    if task.condition == "boxes" and not latent_facts.get("rows_with_boxes"):
        raise ValueError(
            f"task={task.name}: stage.latents_url={inputs.record['latents']} has no layouts. "
            "Name the data's boxes column "
            '(data.input.boxes_col: JSON [{"label": class, "box": [x0, y0, x1, y1]}]) '
            "and run prepare and encode_latents again"
        )
    inputs.found.update(
        resume_from=resume_from,
        spec=spec,
        task=task,
        embedded=task.condition == "caption" and _embedded(inputs, model, storage),
    )
    return inputs


def _embedded(inputs: Inputs, model: DictConfig, storage: Storage) -> bool:
    """Whether to train on the latents' precomputed τθ(y): only when they are the frozen encoder's that
    stage.model.pretrained_text_encoder names (by its weights' digest); another encoder's are refused."""
    made_by = inputs.found["latents"]["facts"].get("text_encoder")
    if made_by is None or model.pretrained_text_encoder is None:  # none there, or τθ trained here: the tokens are read
        return False
    location, subfolder = model_location(model.pretrained_text_encoder), model.pretrained_text_encoder_subfolder
    if weights_digest(location, storage, subfolder) != made_by["sha256"]:
        raise ValueError(
            f"stage.latents_url={inputs.record['latents']} holds text embeddings made by {made_by['location']}"
            f"{_subfolder(made_by['subfolder'])}, but "
            f"stage.model.pretrained_text_encoder={location}{_subfolder(subfolder)} is another encoder: name that one, "
            "or encode the latents with this one (stage=encode_latents stage.text_encoder=...)"
        )
    return True


def _subfolder(subfolder: str | None) -> str:
    return f" (subfolder {subfolder})" if subfolder else ""


def _train(job: Job) -> Output:
    cfg, settings, latents = job.cfg, job.settings, job.inputs.found["latents"]
    # The resolved architecture too: a preset whose definition changed must not resume an older checkpoint.
    architecture = json.dumps(describe(job.inputs.found["spec"]), sort_keys=True)
    identity = training.training_identity(cfg, [*job.inputs.fingerprints, architecture, f"task={task_identity(cfg)}"])
    run_name = f"{STAGE.name}-{identity[:16]}" + (time.strftime("-%Y%m%d-%H%M%S") if settings.resume == "never" else "")
    config = _loop_config(job)
    mlflow.log_params(
        {
            "latents.rows": latents["counts"]["rows_out"],
            "latents.scale_factor": latents["facts"]["scale_factor"],
            "latents.shape": latents["facts"]["latent_shape"],
            "run_name": run_name,
        }
    )
    result = training.trainer(cfg, job.storage, partial(loop.train_loop, config), run_name).fit()
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    if result.checkpoint is None:
        raise RuntimeError(f"{STAGE.name}: training ended without a checkpoint (steps={settings.steps})")
    _publish(job, result.checkpoint, config)
    steps = int(metrics.get("step", 0))
    return Output(
        counts={"steps": steps},
        facts=_facts(job, config, metrics, f"{resolve(settings.checkpoints_url)}/{run_name}"),
        message=f"{STAGE.name}: {steps} steps, final loss {metrics.get('train/loss', float('nan')):.4f}; "
        f"model at {job.out}",
    )


def _loop_config(job: Job) -> loop.LoopConfig:
    """What every worker gets: the typed settings, and the latents' files, vocabulary and models resolved here."""
    cfg, storage, settings = job.cfg, job.storage, job.settings
    source, latents = job.inputs.record["latents"], job.inputs.found["latents"]
    facts, task, embedded = latents["facts"], job.inputs.found["task"], job.inputs.found["embedded"]
    captioned = task.condition == "caption"
    conditions = {
        "caption": [TEXT_EMBEDDING] if embedded else ["input_ids"],
        "label": ["label"],
        "boxes": ["boxes"],
    }.get(task.condition, [])
    extra = list(CONCAT.get(task.concat, ()))  # what the task concatenates to z_t
    files, row_groups = data_row_groups(latents, source)
    columns = ["key", *conditions, *extra, *facts["latent_columns"]]
    pretrained = settings.model.pretrained_text_encoder
    return loop.LoopConfig(
        settings=OmegaConf.to_object(settings),
        task=task,
        data=EpochData(files, row_groups, columns, settings.seed, settings.shuffle_buffer, storage),
        held_out=data_files(latents, source, "held_out"),
        tokenizer=facts["tokenizer"]["path"] if captioned else None,
        max_length=facts["tokenizer"]["max_length"] if captioned else None,
        classes=facts["classes"] if task.condition in ("label", "boxes") else None,
        layout={"max_objects": cfg.task.max_objects, "grid": cfg.task.grid} if task.condition == "boxes" else None,
        # Read here once (a few images), not by the workers: the validation grid's inputs for a task that
        # concatenates an image.
        validation_images=held_out_crops(storage, source, settings.validation.images, facts["resolution"])
        if task.concat
        else None,
        latent_shape=facts["latent_shape"],
        scale_factor=facts["scale_factor"],
        first_stage=facts["first_stage"],
        pretrained_text_encoder=model_location(pretrained) if captioned and pretrained else None,
        pretrained_text_encoder_subfolder=settings.model.pretrained_text_encoder_subfolder,
        empty_text_embedding=_empty_text_embedding(storage, source, facts["text_encoder"]) if embedded else None,
        resume_from=job.inputs.found["resume_from"],
        storage=storage,
        run=training.run_target(job),
    )


def _publish(job: Job, checkpoint, config: loop.LoopConfig) -> None:
    """The last checkpoint's models, the tokenizer and the noise schedule into the output (and MLflow, with
    ``stage.log_model``), as the diffusers folders sample and export read."""
    storage, settings, task = job.storage, job.settings, config.task
    captioned, embedded = task.condition == "caption", job.inputs.found["embedded"]
    fs, root = storage.fsspec(job.out)
    with tempfile.TemporaryDirectory(prefix="ldm-") as local:
        checkpoint.to_directory(local)
        if captioned:
            save_tokenizer(load_tokenizer(config.tokenizer, storage), storage, f"{job.out}/{TOKENIZER_DIR}")
        loop.training_schedule(settings.noise).save_config(os.path.join(local, SCHEDULER_DIR))
        if embedded:  # trained without τθ: the frozen encoder goes into the model as the exported pipeline's ``bert``
            text_encoder = load_text_encoder(
                config.pretrained_text_encoder, storage, config.pretrained_text_encoder_subfolder
            )
            for folder in ("", EMA):
                text_encoder.save_pretrained(os.path.join(local, folder, TEXT_ENCODER), safe_serialization=True)
        conditioner = [TEXT_ENCODER] if captioned else [CONDITIONER] if config.classes else []
        for folder in (UNET, *conditioner, EMA, SCHEDULER_DIR):
            fs.put(os.path.join(local, folder), f"{root}/{folder}", recursive=True)
            if settings.log_model:
                mlflow.log_artifacts(os.path.join(local, folder), f"model/{folder}")


def _facts(job: Job, config: loop.LoopConfig, metrics: dict[str, float], checkpoints: str) -> dict[str, Any]:
    settings, task, facts = job.settings, config.task, job.inputs.found["latents"]["facts"]
    captioned = task.condition == "caption"
    return {
        "layout": {
            "unet": f"{UNET}/",
            "ema": f"{EMA}/",
            "scheduler": f"{SCHEDULER_DIR}/",
            **({"text_encoder": f"{TEXT_ENCODER}/", "tokenizer": f"{TOKENIZER_DIR}/"} if captioned else {}),
            **({"conditioner": f"{CONDITIONER}/"} if config.classes else {}),
        },
        "classes": config.classes,
        "task": task.name,
        "pipeline": task.pipeline,
        "preset": str(settings.model.preset),
        "text_encoder_trained": captioned and settings.model.pretrained_text_encoder is None,
        "text_embeddings_precomputed": job.inputs.found["embedded"],
        "first_stage": facts["first_stage"],
        "scale_factor": facts["scale_factor"],
        "latent_shape": facts["latent_shape"],
        "resolution": facts["resolution"],
        "max_length": config.max_length,
        "prediction_type": str(settings.noise.prediction_type),
        "global_batch_size": settings.batch_size * settings.scaling.num_workers * settings.optimizer.accumulation,
        "final_metrics": metrics,
        "checkpoints": checkpoints,
    }


def _empty_text_embedding(storage: Storage, latents: str, made_by: dict[str, Any]):
    """The empty caption's τθ(y) that encode_latents stored beside the embeddings: caption dropout's."""
    fs, root = storage.fsspec(latents)
    with fs.open(f"{root}/{made_by['empty']}", "rb") as f:
        return load(f.read())[TEXT_EMBEDDING]


def _resume_from(resume: str, storage: Storage) -> ray.train.Checkpoint | None:
    """``latest`` and ``never`` are run names' business; anything else is a checkpoint folder to start from."""
    if resume in ("latest", "never"):
        return None
    url = resolve(resume)
    fs, path = storage.pyarrow(url)
    if fs.get_file_info(f"{path}/{STATE_FILE}").type != FileType.File:
        raise FileNotFoundError(
            f"stage.resume={resume}: no {STATE_FILE} there; "
            "give latest, never, or a checkpoint_* folder of a train_ldm run"
        )
    return ray.train.Checkpoint(path, filesystem=fs)
