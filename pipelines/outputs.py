"""What identifies a stage's output, and whether the workers can reach where it goes."""

from __future__ import annotations

from typing import Iterable

from omegaconf import DictConfig, OmegaConf

from ldm.manifest import fingerprint


def stage_fingerprint(cfg: DictConfig, code_version: int, inputs: Iterable[str] = ()) -> str:
    """Fingerprint of the stage and data config plus the code's output version and the inputs' fingerprints.

    ``stage.resources`` (CPUs, concurrency, batch sizes for throughput) is left out: how fast an output was
    made does not change what it is, so re-running with more parallelism finds the finished output.
    """
    stage = OmegaConf.to_container(cfg.stage, resolve=True)
    stage.pop("resources", None)
    identity = {"stage": stage, "data": OmegaConf.to_container(cfg.data, resolve=True), "code_version": code_version}
    return fingerprint(identity, inputs)


def require_reachable_storage(cfg: DictConfig, is_local: bool) -> None:
    """Refuse node-local storage on a multi-node cluster unless the user says every node mounts it."""
    if is_local and cfg.cluster.address != "local" and not cfg.storage.get("shared", False):
        raise ValueError(
            f"storage.root={cfg.storage.root} is a local path but cluster.address={cfg.cluster.address}: workers on "
            "other nodes would write to their own disks. Use storage=s3, or storage.shared=true if every node "
            "mounts this path (NFS, or a one-machine cluster)."
        )
