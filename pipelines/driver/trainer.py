"""What the two Ray Train stages (train_autoencoder, train_ldm) share on the driver: the run a re-run continues,
the TorchTrainer over the cluster and storage the config names, and the MLflow run workers log to."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import ray.train
from omegaconf import DictConfig
from ray.train.torch import TorchTrainer

from ldm.manifest import fingerprint
from ldm.storage import Storage, resolve
from pipelines.driver.cluster import Request
from pipelines.driver.stage import Job, settings
from pipelines.schema import OPERATIONAL, RUN_EXTENT
from pipelines.worker.run_logger import RunTarget


def ray_train_environment(cluster: DictConfig) -> dict[str, str]:
    """Ray Train settings it reads from the environment, in its controller and workers: it passes the driver's
    values on to them. A value the user set in the environment is kept."""
    settings = {
        # A worker's print() reaches the console once: Ray Train's print patch also sends it to a logger, and each
        # progress line showed twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if cluster.address == "local":
        # No node of a local cluster is ever drained or preempted; the watcher only logs a core-worker error about
        # its own restart arguments (ray-project/ray#53727).
        settings["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return settings


def training_identity(cfg: DictConfig, inputs: Iterable[str]) -> str:
    """The fingerprint of a training trajectory: the stage's settings but the operational and run-extent ones
    (``pipelines.schema``), the global batch and the inputs."""
    stage = settings(cfg.stage, leaving_out=(OPERATIONAL, RUN_EXTENT))
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


def trainer(cfg: DictConfig, storage: Storage, loop: Callable[[], None], run_name: str) -> TorchTrainer:
    """A TorchTrainer running ``loop`` on ``stage.scaling`` whose checkpoints go to
    ``stage.checkpoints_url``/``run_name``: the same name on a re-run (or after a worker failure) restores the
    latest checkpoint there."""
    for name, value in ray_train_environment(cfg.cluster).items():
        os.environ.setdefault(name, value)
    scaling = cfg.stage.scaling
    resources = worker_resources(scaling)
    checkpoints = resolve(cfg.stage.checkpoints_url)
    checkpoints_fs, checkpoints_path = storage.pyarrow(checkpoints)
    print(
        f"{cfg.stage.name}: {scaling.num_workers} Ray Train workers, run {run_name} "
        f"(checkpoints in {checkpoints}/{run_name})",
        flush=True,
    )
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
            # Ray Train's INFO records (a "Reporting training result" line per report from every worker) go
            # to its log files, not the console: the loops print their own progress.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
