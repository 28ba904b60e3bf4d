"""stage=train_autoencoder: the first stage (KL or VQ autoencoder) on the prepared images, with Ray Train.

Ray Data decodes, crops and flips the prepared shards' images on CPU tasks and streams them to the Ray Train
workers (``pipelines/autoencoder_loop.py``). Checkpoints go to ``stage.checkpoints_url`` under a run name
made from the config fingerprint, so the same command after a kill (or a worker failure) resumes from the
latest one. The final autoencoder is written in diffusers format to ``stage.output_url`` with a manifest.
"""

from __future__ import annotations

import os
import tempfile
import time
from functools import partial
from typing import Any

import mlflow
import numpy as np
import ray
import ray.train
from omegaconf import DictConfig, OmegaConf

from ldm.data.images import is_held_out, to_pixels
from ldm.manifest import data_files, verify, write_manifest
from ldm.models.first_stage import factor, kind, load_first_stage, model_location
from ldm.storage import Storage, resolve
from pipelines import autoencoder_loop, training
from pipelines.cluster import connect
from pipelines.outputs import claim_or_skip, require_reachable_storage, stage_fingerprint
from pipelines.tracking import stage_run

STAGE = "train_autoencoder"
VERSION = 1


def run(cfg: DictConfig) -> dict[str, Any]:
    storage = Storage.from_config(cfg.storage)
    settings = cfg.stage
    source = resolve(cfg.data.prepared_url)
    prepared = verify(storage, source, stage="prepare")
    out = resolve(settings.output_url)
    require_reachable_storage(cfg, storage.is_local(out))
    identity = stage_fingerprint(cfg, VERSION, [prepared["fingerprint"]])
    run_name = f"{STAGE}-{training.training_identity(cfg, [prepared['fingerprint']])[:16]}"

    with stage_run(cfg, STAGE) as active:
        done = claim_or_skip(cfg, storage, out, STAGE, identity, detail="{steps} steps")
        if done is not None:
            return done
        connect(cfg.cluster)
        started = time.time()
        shards = data_files(prepared, source)
        pafs, _ = storage.pyarrow(source)
        rows = ray.data.read_parquet([storage.pyarrow(s)[1] for s in shards], filesystem=pafs, columns=["key", "image"])
        pixels = partial(_pixels, resolution=cfg.data.resolution, fraction=settings.held_out_fraction)
        decode_cpus = settings.resources.num_cpus_per_decode_task
        datasets = {
            "train": rows.map_batches(partial(pixels, train=True, flip=settings.random_flip), num_cpus=decode_cpus),
            "validation": rows.map_batches(partial(pixels, train=False, flip=False), num_cpus=decode_cpus),
        }
        fit = training.trainer(cfg, storage, autoencoder_loop.train_loop, _loop_config(cfg, active.info.run_id), run_name, datasets)
        result = fit.fit()
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}

        fs, root = storage.fsspec(out)
        with tempfile.TemporaryDirectory(prefix="autoencoder-") as local:
            result.checkpoint.to_directory(local)
            model_dir = os.path.join(local, autoencoder_loop.MODEL_DIR)
            model = load_first_stage(model_dir)
            fs.put(model_dir, f"{root}/model", recursive=True)
        elapsed = time.time() - started
        manifest = write_manifest(
            storage,
            out,
            stage=STAGE,
            fingerprint=identity,
            inputs={"prepared": source, "fingerprint": prepared["fingerprint"]},
            counts={"steps": int(metrics.get("step", 0))},
            timings={"seconds": round(elapsed, 3)},
            facts={
                "model": "model/",
                "kind": kind(model),
                "factor": factor(model),
                "latent_channels": model.config.latent_channels,
                "parameters": sum(p.numel() for p in model.parameters()),
                "resolution": cfg.data.resolution,
                "final_metrics": metrics,
                "checkpoints": f"{resolve(settings.checkpoints_url)}/{run_name}",
            },
        )
        mlflow.log_dict(manifest, "manifest.json")
        val = {k: v for k, v in metrics.items() if k.startswith("val/")}
        print(f"{STAGE}: {int(metrics.get('step', 0))} steps in {elapsed:.0f}s; {val}; model at {out}/model")
        return manifest


def _pixels(batch: dict[str, np.ndarray], *, resolution: int, fraction: float, train: bool, flip: bool) -> dict[str, np.ndarray]:
    """Ray Data task: the batch's training (or held-out) images as float32 crops in [-1, 1]."""
    rng = np.random.default_rng() if train else None
    keep = [is_held_out(str(k), fraction) != train for k in batch["key"]]
    images = [to_pixels(data, resolution, rng, flip) for data, kept in zip(batch["image"], keep) if kept]
    return {"pixels": np.stack(images) if images else np.zeros((0, 3, resolution, resolution), np.float32)}


def _loop_config(cfg: DictConfig, run_id: str) -> dict[str, Any]:
    settings = OmegaConf.to_container(cfg.stage, resolve=True)
    return {
        "preset": settings["model"]["preset"],
        "preset_overrides": settings["model"]["overrides"],
        "logvar_bias": settings["model"]["logvar_bias"],
        "pretrained": model_location(settings["pretrained"]) if settings["pretrained"] else None,
        "loss": settings["loss"],
        "disc_layers": settings["disc_layers"],
        "lpips_weights": settings["lpips_weights"],
        "lr": settings["optimizer"]["lr"],
        "disc_lr": settings["optimizer"]["disc_lr"],
        "betas": settings["optimizer"]["betas"],
        "schedule": {k: settings["optimizer"][k] for k in ("schedule", "warmup_steps", "final_ratio")},
        **{k: settings[k] for k in ("steps", "batch_size", "seed", "log_every", "eval_every", "checkpoint_every", "bf16")},
        "storage": Storage.from_config(cfg.storage),
        "tracking_uri": training.worker_tracking_uri(cfg),
        "run_id": run_id,
    }
