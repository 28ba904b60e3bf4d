"""What identifies a stage's output, and whether the workers can reach where it goes."""

from __future__ import annotations

from typing import Any, Iterable

import mlflow
from omegaconf import DictConfig, OmegaConf

from ldm.manifest import claim_output, fingerprint
from ldm.storage import Storage


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


def claim_or_skip(
    cfg: DictConfig, storage: Storage, out: str, stage: str, identity: str, resume: bool = False, detail: str = ""
) -> dict[str, Any] | None:
    """Claim ``out`` for this run (see ``claim_output``); if it is already complete for this fingerprint, say so
    on the console and on the MLflow run and return its manifest, so the stage can return without work."""
    done = claim_output(storage, out, stage=stage, fingerprint=identity, overwrite=cfg.overwrite, resume=resume)
    if done is not None:
        mlflow.set_tag("skipped", "complete output with the same fingerprint")
        counts = f" ({detail.format(**done['counts'])})" if detail else ""
        print(f"{stage}: {out} is already complete for this config{counts}; nothing to do")
    return done
