"""stage=train_autoencoder: the first stage (KL or VQ autoencoder) on the prepared images, with Ray Train.

Each Ray Train worker (``loop.py``) reads its run of every epoch's order of the prepared shards with Ray Data
(``EpochData``, as train_ldm does, so a restart continues the epoch exactly), decoding, cropping and flipping on CPU
tasks (``remote.py``) with crops drawn from the seed, the epoch and the row's key. Checkpoints
(``pipelines.worker.checkpoint``) go to ``stage.checkpoints_url`` under a run name made from the training settings,
so the same command after a kill (or a worker failure) resumes from the latest one. The final autoencoder is written
in diffusers format to ``stage.output_url``. It trains on prepare's ``shards/`` and validates on at most
``stage.validation_images`` of its ``held_out/`` rows, the ones stage=evaluate measures it on.
"""

from __future__ import annotations

import os
import tempfile
from functools import partial
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.manifest import data_files, data_row_groups
from ldm.models.first_stage import factor, kind, load_first_stage
from ldm.models.presets import first_stage_preset
from ldm.storage import model_location, resolve
from pipelines.driver import trainer as training
from pipelines.driver.stage import Inputs, Job, Output, Stage
from pipelines.stages.train_autoencoder import loop
from pipelines.worker.data import EpochData

# 3: trains on prepare's shards/ and validates on its held_out/ (prepare's held-out set).
STAGE = Stage(
    "train_autoencoder",
    version=3,
    output_url=lambda cfg: cfg.stage.output_url,
    detail="{steps} steps",
    requests=lambda cfg: training.requests(cfg, cfg.stage.resources.num_cpus_per_decode_task),
)
MODEL = "model"


def run(cfg: DictConfig) -> dict[str, Any]:
    return STAGE.run(
        cfg, lambda cfg, storage: Inputs.output_of("prepare", cfg.data.prepared_url, storage, "prepared"), _train
    )


def _train(job: Job) -> Output:
    cfg, storage, settings = job.cfg, job.storage, job.settings
    # Checked here, not first in the workers, where Ray Train would retry the error: a preset's factor is known
    # without building it (a pretrained model's is checked once loaded, in the loop).
    f = None if settings.pretrained else first_stage_preset(settings.model.preset, settings.model.overrides).factor
    if settings.crop is not None and (not 0 < settings.crop <= cfg.data.resolution or (f and settings.crop % f)):
        raise ValueError(
            f"stage.crop={settings.crop}: expected null or a side in (0, data.resolution={cfg.data.resolution}]"
            + (f", a multiple of the first stage's factor {f}" if f else "")
        )
    source, prepared = job.inputs.record["prepared"], job.inputs.found["prepared"]
    run_name = f"{STAGE.name}-{training.training_identity(cfg, job.inputs.fingerprints)[:16]}"
    files, row_groups = data_row_groups(prepared, source)
    config = loop.LoopConfig(
        settings=OmegaConf.to_object(settings),
        data=EpochData(files, row_groups, ["key", "image"], settings.seed, settings.shuffle_buffer, storage),
        held_out=data_files(prepared, source, "held_out"),
        resolution=cfg.data.resolution,
        pretrained=model_location(settings.pretrained) if settings.pretrained else None,
        storage=storage,
        run=training.run_target(job),
    )
    result = training.trainer(cfg, storage, partial(loop.train_loop, config), run_name).fit()
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}

    fs, root = storage.fsspec(job.out)
    with tempfile.TemporaryDirectory(prefix="autoencoder-") as local:
        result.checkpoint.to_directory(local)
        model_dir = os.path.join(local, loop.MODEL_DIR)
        model = load_first_stage(model_dir)
        fs.put(model_dir, f"{root}/{MODEL}", recursive=True)
    steps = int(metrics.get("step", 0))
    val = {k: v for k, v in metrics.items() if k.startswith("val/")}
    return Output(
        counts={"steps": steps},
        facts={
            "model": f"{MODEL}/",
            "kind": kind(model),
            "factor": factor(model),
            "latent_channels": model.config.latent_channels,
            "parameters": sum(p.numel() for p in model.parameters()),
            "resolution": cfg.data.resolution,
            "held_out": prepared["facts"].get("held_out"),
            "final_metrics": metrics,
            "checkpoints": f"{resolve(settings.checkpoints_url)}/{run_name}",
        },
        message=f"{STAGE.name}: {steps} steps; {val}; model at {job.out}/{MODEL}",
    )
