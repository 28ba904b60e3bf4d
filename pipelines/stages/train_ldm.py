"""stage=train_ldm: the text-to-image latent diffusion model on the precomputed latents, with Ray Train.

Ray Data streams the latent shards (moments, tokens) to the workers, split between them, block order
randomised every epoch and shuffled locally (``pipelines/ldm_loop.py``); training never touches pixels.
Checkpoints go to ``stage.checkpoints_url`` under a run name made from the training settings, so the same
command after a kill continues (``resume=latest``), and a dying worker restarts the group from the latest one
(``scaling.max_failures``). The final model (UNet, τθ, their EMA, tokenizer, noise schedule; the first stage by
reference) is written to ``stage.output_url`` with a manifest, and logged to the MLflow run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import mlflow
import ray
import ray.train
from omegaconf import DictConfig, OmegaConf
from pyarrow.fs import FileType

from ldm.manifest import data_files, verify, write_manifest
from ldm.models.first_stage import model_location
from ldm.models.text_to_image import EMA, TEXT_ENCODER, UNET, describe, preset
from ldm.storage import Storage, resolve
from ldm.text.tokenizer import load_tokenizer, save_tokenizer
from pipelines import ldm_loop, training
from pipelines.cluster import connect
from pipelines.outputs import claim_or_skip, require_reachable_storage, stage_fingerprint
from pipelines.tracking import stage_run

STAGE = "train_ldm"
VERSION = 2  # 2: the tiny preset's τθ is a BertModel
SCHEDULER_DIR, TOKENIZER_DIR = "scheduler", "tokenizer"


def run(cfg: DictConfig) -> dict[str, Any]:
    storage = Storage.from_config(cfg.storage)
    settings = cfg.stage
    source = resolve(settings.latents_url)
    latents = verify(storage, source, stage="encode_latents")
    facts = latents["facts"]
    spec = preset(settings.model.preset, settings.model.unet, settings.model.text_encoder)  # a bad name fails here
    out = resolve(settings.output_url)
    require_reachable_storage(cfg, storage.is_local(out))
    resume_from = _resume_from(settings.resume, storage)
    inputs = [latents["fingerprint"], *([resume_from.path] if resume_from else [])]
    identity = stage_fingerprint(cfg, VERSION, inputs)
    # The resolved architecture too: a preset whose definition changed must not resume an older checkpoint.
    run_name = f"{STAGE}-{training.training_identity(cfg, [*inputs, json.dumps(describe(spec), sort_keys=True)])[:16]}"
    if settings.resume == "never":
        run_name += time.strftime("-%Y%m%d-%H%M%S")

    with stage_run(cfg, STAGE) as active:
        done = claim_or_skip(cfg, storage, out, STAGE, identity, detail="{steps} steps")
        if done is not None:
            return done
        connect(cfg.cluster)
        started = time.time()
        columns = ["key", "input_ids", *facts["latent_columns"]]
        shards = data_files(latents, source)
        pafs, _ = storage.pyarrow(source)
        rows = ray.data.read_parquet([storage.pyarrow(s)[1] for s in shards], filesystem=pafs, columns=columns)
        loop_config = {**_loop_config(cfg, facts, active.info.run_id), "resume_from": resume_from}
        mlflow.log_params({"latents.rows": latents["counts"]["rows_out"], "latents.scale_factor": facts["scale_factor"],
                           "latents.shape": facts["latent_shape"], "run_name": run_name})
        fit = training.trainer(cfg, storage, ldm_loop.train_loop, loop_config, run_name, {"train": rows.randomize_block_order()})
        result = fit.fit()
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        if result.checkpoint is None:
            raise RuntimeError(f"{STAGE}: training ended without a checkpoint (steps={settings.steps})")

        fs, root = storage.fsspec(out)
        with tempfile.TemporaryDirectory(prefix="ldm-") as local:
            result.checkpoint.to_directory(local)
            save_tokenizer(load_tokenizer(loop_config["tokenizer"], storage), storage, f"{out}/{TOKENIZER_DIR}")
            ldm_loop.training_schedule(loop_config).save_config(os.path.join(local, SCHEDULER_DIR))
            for folder in (UNET, TEXT_ENCODER, EMA, SCHEDULER_DIR):
                fs.put(os.path.join(local, folder), f"{root}/{folder}", recursive=True)
            if settings.log_model:
                for folder in (UNET, TEXT_ENCODER, EMA, SCHEDULER_DIR):
                    mlflow.log_artifacts(os.path.join(local, folder), f"model/{folder}")
        elapsed = time.time() - started
        steps = int(metrics.get("step", 0))
        manifest = write_manifest(
            storage,
            out,
            stage=STAGE,
            fingerprint=identity,
            inputs={"latents": source, "fingerprint": latents["fingerprint"]},
            counts={"steps": steps},
            timings={"seconds": round(elapsed, 3)},
            facts={
                "layout": {"unet": f"{UNET}/", "text_encoder": f"{TEXT_ENCODER}/", "ema": f"{EMA}/",
                           "tokenizer": f"{TOKENIZER_DIR}/", "scheduler": f"{SCHEDULER_DIR}/"},
                "preset": settings.model.preset,
                "text_encoder_trained": settings.model.pretrained_text_encoder is None,
                "first_stage": facts["first_stage"],
                "scale_factor": facts["scale_factor"],
                "latent_shape": facts["latent_shape"],
                "resolution": facts["resolution"],
                "max_length": facts["tokenizer"]["max_length"],
                "prediction_type": settings.noise.prediction_type,
                "global_batch_size": settings.batch_size * settings.scaling.num_workers * settings.optimizer.accumulation,
                "final_metrics": metrics,
                "checkpoints": f"{resolve(settings.checkpoints_url)}/{run_name}",
            },
        )
        mlflow.log_dict(manifest, "manifest.json")
        print(f"{STAGE}: {steps} steps in {elapsed:.0f}s, final loss {metrics.get('train/loss', float('nan')):.4f}; model at {out}")
        return manifest


def _resume_from(resume: str, storage: Storage) -> ray.train.Checkpoint | None:
    """``latest`` and ``never`` are run names' business; anything else is a checkpoint folder to start from."""
    if resume in ("latest", "never"):
        return None
    url = resolve(resume)
    fs, path = storage.pyarrow(url)
    if fs.get_file_info(f"{path}/{ldm_loop.STATE_FILE}").type != FileType.File:
        raise FileNotFoundError(f"stage.resume={resume}: no {ldm_loop.STATE_FILE} there; give latest, never, or a checkpoint_* folder of a train_ldm run")
    return ray.train.Checkpoint(path, filesystem=fs)


def _loop_config(cfg: DictConfig, facts: dict[str, Any], run_id: str) -> dict[str, Any]:
    settings = OmegaConf.to_container(cfg.stage, resolve=True)
    model = settings["model"]
    return {
        "preset": model["preset"],
        "unet": model["unet"],
        "text_encoder": model["text_encoder"],
        "pretrained_text_encoder": model_location(model["pretrained_text_encoder"]) if model["pretrained_text_encoder"] else None,
        "tokenizer": facts["tokenizer"]["path"],
        "max_length": facts["tokenizer"]["max_length"],
        "latent_shape": facts["latent_shape"],
        "scale_factor": facts["scale_factor"],
        "first_stage": facts["first_stage"],
        "schedule": {k: settings["optimizer"][k] for k in ("schedule", "warmup_steps", "final_ratio")},
        **{k: settings[k] for k in ("noise", "caption_dropout", "optimizer", "ema", "steps", "batch_size", "seed", "shuffle_buffer", "prefetch_batches",
                                    "bf16", "attention", "gradient_checkpointing", "compile", "data_audit", "log_every", "checkpoint_every",
                                    "sample_every", "validation")},
        "storage": Storage.from_config(cfg.storage),
        "tracking_uri": training.worker_tracking_uri(cfg),
        "run_id": run_id,
    }
