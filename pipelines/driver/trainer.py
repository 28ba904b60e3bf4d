"""What the two Ray Train stages (train_autoencoder, train_ldm) share on the driver: the run a re-run continues,
the TorchTrainer over the cluster and storage the config names, and the MLflow run workers log to."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import ray.train
from omegaconf import DictConfig
from ray.train.torch import TorchTrainer

from ldm.manifest import fingerprint
from ldm.storage import Storage, resolve
from pipelines.driver.cluster import Request
from pipelines.driver.config import plain
from pipelines.driver.stage import NOT_CONTENT, Job
from pipelines.train_worker import RunTarget

# Besides what is not content at all: how long to train, where to write, on what hardware and whether to
# resume. None of it changes the training trajectory, so a re-run with more steps (or other cadences or
# workers' CPUs) continues the same run.
NOT_TRAINING = (*NOT_CONTENT["stage"], "steps", "scaling", "output_url", "checkpoints_url", "resume")


def training_identity(cfg: DictConfig, inputs: Iterable[str]) -> str:
    """The fingerprint of a training trajectory: the stage's training settings, the global batch and inputs."""
    stage = {k: v for k, v in plain(cfg.stage).items() if k not in NOT_TRAINING}
    stage["num_workers"] = cfg.stage.scaling.num_workers  # the global batch: part of the trajectory
    return fingerprint({"stage": stage, "resolution": cfg.data.resolution}, list(inputs))


def run_target(job: Job) -> RunTarget:
    """The stage's MLflow run, its tracking URI as workers (other processes, other directories) must spell it."""
    uri = job.cfg.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{os.path.abspath(uri.removeprefix('sqlite:///'))}"
    return RunTarget(uri, job.run_id)


def worker_resources(scaling: DictConfig) -> dict[str, float]:
    """One Ray Train worker's resources (``stage.scaling``). A DDP worker drives exactly one whole GPU: NCCL cannot
    put two ranks on one GPU, and DDP leaves a second one idle."""
    if scaling.use_gpu and scaling.gpus_per_worker != 1:
        raise ValueError(
            f"stage.scaling.gpus_per_worker={scaling.gpus_per_worker:g} with stage.scaling.use_gpu=true: expected 1 "
            "(each DDP worker drives one whole GPU); use more stage.scaling.num_workers for more GPUs"
        )
    return {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})}


def requests(cfg: DictConfig, data_task_cpus: float) -> list[Request]:
    """What a training stage asks Ray for at once: its workers, and room for one of the Ray Data tasks that feed
    them (``data_task_cpus``), which would otherwise wait forever behind workers holding every CPU."""
    scaling = cfg.stage.scaling
    return [
        Request("stage.scaling.num_workers", worker_resources(scaling), scaling.num_workers),
        Request("a data task", {"CPU": data_task_cpus}),
    ]


def trainer(
    cfg: DictConfig, storage: Storage, loop: Callable[[], None], run_name: str, datasets: dict[str, Any]
) -> TorchTrainer:
    """A TorchTrainer running ``loop`` on ``stage.scaling`` whose checkpoints go to
    ``stage.checkpoints_url``/``run_name``: the same name on a re-run (or after a worker failure) restores the
    latest checkpoint there."""
    for dataset in datasets.values():
        # Read in Ray Train's processes, which have no terminal: a progress bar there only floods the driver's
        # console with repaint lines, long after the data is read.
        dataset.context.enable_progress_bars = False
    scaling = cfg.stage.scaling
    resources = worker_resources(scaling)
    checkpoints_fs, checkpoints_path = storage.pyarrow(resolve(cfg.stage.checkpoints_url))
    return TorchTrainer(
        loop,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=str(scaling.placement_strategy),
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=checkpoints_path,
            storage_filesystem=checkpoints_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.stage.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[name for name in datasets if name == "train"]),
    )
