"""Start or join the Ray cluster that a stage runs on, per ``cfg.cluster``."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import ray
import ray.data  # noqa: F401  (loaded before quiet_ray: it sets up Ray Data's loggers)
from omegaconf import DictConfig

from pipelines.worker.console import quiet_ray

log = logging.getLogger(__name__)


_started_here = False  # whether connect() started the local cluster this process is attached to


def connect(cluster: DictConfig) -> None:
    """Join ``cluster.address`` (``auto`` under ``ray job submit``) or start a local cluster in-process.

    A Ray already initialised in this process (tests, chained stages) is reused as it is.
    """
    global _started_here
    if ray.is_initialized():
        quiet_ray()
        return
    if cluster.address == "local":
        _started_here = True
        # More logical CPUs than cores: actors and train workers never take every slot, so Ray Data's
        # read and decode tasks can always be scheduled (on 2 cores Ray otherwise deadlocks silently).
        ray.init(
            address="local",
            num_cpus=cluster.num_cpus,
            num_gpus=cluster.num_gpus,
            object_store_memory=cluster.object_store_memory,
            include_dashboard=cluster.include_dashboard,
            log_to_driver=True,
            # Ray starts at most as many worker processes at once as there are cores, and warns each time a
            # stage has several times that many (Ray Data's tasks, actors and the training workers beside each
            # other): this cluster declares cluster.num_cpus logical CPUs on purpose, so it may start as many.
            _system_config=_startup_concurrency(cluster.num_cpus),
            # Every process of the cluster keeps Ray's chatter off the console as it starts.
            runtime_env={"worker_process_setup_hook": "pipelines.worker.console.quiet_process"},
        )
    else:
        ray.init(address=cluster.address)
    quiet_ray()
    log.info("Ray resources: %s", ray.cluster_resources())


def _startup_concurrency(num_cpus: float | None) -> dict[str, int]:
    return {"worker_maximum_startup_concurrency": int(num_cpus)} if num_cpus else {}


def disconnect() -> None:
    """Stop the local cluster ``connect`` started (its workers' last log lines are flushed to this console
    first); leave any other Ray as it is."""
    global _started_here
    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False


@dataclass(frozen=True)
class Request:
    """What a stage asks Ray for at once: ``count`` workers, actors or tasks of ``resources`` each, asked for by
    ``setting`` (as a user overrides it)."""

    setting: str
    resources: dict[str, float] = field(default_factory=dict)
    count: int = 1


def check_plan(cluster: DictConfig, requests: Iterable[Request]) -> None:
    """Refuse, before anything is scheduled, a plan the cluster can never place: Ray would wait for it forever
    without a word (train workers asking for GPUs on a cluster of none, encoder actors holding every CPU the
    decode tasks need). Only a local cluster (``cluster.address=local``) has a fixed size; an autoscaling one adds
    nodes for what it is asked, so it is not checked here."""
    if cluster.address != "local":
        return
    requests = [r for r in requests if r.count]
    needed: dict[str, float] = defaultdict(float)
    for request in requests:
        for name, amount in request.resources.items():
            needed[name] += amount * request.count
    have = ray.cluster_resources()
    for name, need in needed.items():
        if need > have.get(name, 0):
            asking = ", ".join(
                f"{r.setting}: {r.count} x {r.resources[name]:g}" for r in requests if r.resources.get(name)
            )
            setting = {"CPU": "cluster.num_cpus", "GPU": "cluster.num_gpus"}.get(name, "the cluster's resources")
            raise ValueError(
                f"{asking} {name} at once: {need:g} {name}, the local cluster has {have.get(name, 0):g} ({setting})"
            )
