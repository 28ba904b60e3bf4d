"""Start or join the Ray cluster that a stage runs on, per ``cfg.cluster``."""

from __future__ import annotations

import logging

import ray
from omegaconf import DictConfig

log = logging.getLogger(__name__)


_started_here = False  # whether connect() started the local cluster this process is attached to


def connect(cluster: DictConfig) -> None:
    """Join ``cluster.address`` (``auto`` under ``ray job submit``) or start a local cluster in-process.

    A Ray already initialised in this process (tests, chained stages) is reused as it is.
    """
    global _started_here
    if ray.is_initialized():
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
        )
    else:
        ray.init(address=cluster.address)
    log.info("Ray resources: %s", ray.cluster_resources())


def disconnect() -> None:
    """Stop the local cluster ``connect`` started (its workers' last log lines are flushed to this console
    first); leave any other Ray as it is."""
    global _started_here
    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False
