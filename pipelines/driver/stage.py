"""The run every stage goes through; a stage module supplies only what is its own.

1. storage from the config, and a refusal of node-local storage on a multi-node cluster;
2. the stage's inputs found and verified (``find_inputs``): their manifests' fingerprints become part of the
   output's, so a changed input means a new output;
3. the output's fingerprint: the resolved stage and data config (less the settings declared ``operational`` in
   ``pipelines.schema``: how fast an output was made, and how it was logged and watched, do not change what it
   is), the code's output version and the inputs' fingerprints;
4. an MLflow run named after the stage (nested under a pipeline's run);
5. the output location claimed, or the stage skipped when it is already complete for this fingerprint;
6. Ray, for the stages that use it, and the stage's resource plan checked against it;
7. the stage's own ``work``, which writes the output's files and says what they are (``Output``);
8. the manifest written last, as the commit marker, then logged with the stage's metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, is_dataclass
from typing import Any

import mlflow
from omegaconf import DictConfig, OmegaConf

from ldm.manifest import claim_output, fingerprint, verify, write_manifest
from ldm.storage import Storage, resolve
from pipelines.driver.cluster import Request, check_plan, connect
from pipelines.driver.config import plain
from pipelines.driver.tracking import stage_run
from pipelines.schema import OPERATIONAL, RUN_EXTENT, roles
from pipelines.worker.console import quiet_libraries


@dataclass
class Inputs:
    """What a stage found before anything starts."""

    fingerprints: list[str] = field(default_factory=list)  # its inputs' identities: part of the output's
    record: dict[str, Any] = field(default_factory=dict)  # what the manifest's ``inputs`` says of them
    found: dict[str, Any] = field(default_factory=dict)  # anything else the work needs (manifests, models)

    @classmethod
    def output_of(cls, stage: str, url: str, storage: Storage, name: str) -> Inputs:
        """A complete output of ``stage`` at ``url`` (its manifest verified), recorded as ``name``: its
        fingerprint, ``record[name]`` its URL, ``found[name]`` its manifest."""
        url = resolve(url)
        manifest = verify(storage, url, stage=stage)
        return cls([manifest["fingerprint"]], {name: url, "fingerprint": manifest["fingerprint"]}, {name: manifest})


@dataclass
class Job:
    """One stage invocation that has claimed its output and has work to do."""

    cfg: DictConfig
    storage: Storage
    out: str
    inputs: Inputs
    fingerprint: str
    run_id: str  # the stage's MLflow run, which Ray Train workers log to

    @property
    def settings(self) -> DictConfig:
        return self.cfg.stage


@dataclass
class Output:
    """What the work made: the manifest's fields besides the ones the skeleton fills in, the MLflow metrics,
    and the line printed once the output is committed."""

    counts: dict[str, Any] | None = None
    facts: dict[str, Any] | None = None
    schema: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)  # besides ``seconds``
    expected_files: dict[str, int] | None = None  # what workers reported writing: must be visible here
    row_groups: dict[str, list[int]] | None = (
        None  # data file -> rows of each row group: what training plans epochs from
    )
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""


class Ran(dict):
    """What ``Stage.run`` returns: the output's manifest (as written, or as found complete), with the MLflow run
    that made it or found it complete (``run_id``) and whether it was already complete (``skipped``)."""

    def __init__(self, manifest: dict[str, Any], run_id: str, skipped: bool):
        super().__init__(manifest)
        self.run_id, self.skipped = run_id, skipped


@dataclass(frozen=True)
class Stage:
    name: str
    version: int  # the code's output version: bump it when the same config would now write something else
    output_url: Callable[[DictConfig], str]  # where the output goes, from the config
    uses_ray: bool = True
    uses_task: bool = False  # what it writes depends on the task (the others read it from their input's manifest)
    resume: bool = False  # a partial output of the same config is continued, not cleared
    detail: str = ""  # the "nothing to do" line's description of a complete output, from its counts
    # What the stage asks Ray for at once (its settings checked as they are built): refused before any work
    # when the cluster can never place it.
    requests: Callable[[DictConfig], list[Request]] = lambda cfg: []

    def run(
        self, cfg: DictConfig, find_inputs: Callable[[DictConfig, Storage], Inputs], work: Callable[[Job], Output]
    ) -> Ran:
        quiet_libraries()
        storage = Storage.from_config(cfg.storage)
        out = resolve(self.output_url(cfg))
        requests = self.requests(cfg)  # settings that can never work are refused before anything is read
        require_reachable_storage(cfg, storage.is_local(out))
        inputs = find_inputs(cfg, storage)
        identity = stage_fingerprint(cfg, self.version, inputs.fingerprints, self.uses_task)
        with stage_run(cfg, self.name) as active:
            done = claim_output(
                storage, out, stage=self.name, fingerprint=identity, overwrite=cfg.overwrite, resume=self.resume
            )
            if done is not None:
                mlflow.set_tag("skipped", "complete output with the same fingerprint")
                counts = f" ({self.detail.format(**done['counts'])})" if self.detail else ""
                print(f"{self.name}: {out} is already complete for this config{counts}; nothing to do")
                return Ran(done, active.info.run_id, skipped=True)
            if self.uses_ray:
                connect(cfg.cluster)
                check_plan(cfg.cluster, requests)
            started = time.time()
            output = work(Job(cfg, storage, out, inputs, identity, active.info.run_id))
            seconds = time.time() - started
            extra = {
                k: v
                for k, v in (
                    ("counts", output.counts),
                    ("facts", output.facts),
                    ("schema", output.schema),
                    ("row_groups", output.row_groups),
                )
                if v is not None
            }
            manifest = write_manifest(
                storage,
                out,
                stage=self.name,
                fingerprint=identity,
                expected_files=output.expected_files,
                inputs=inputs.record,
                timings={"seconds": round(seconds, 3), **output.timings},
                **extra,
            )
            mlflow.log_metrics({**output.metrics, "seconds": seconds})
            mlflow.log_dict(manifest, "manifest.json")
            if output.message:
                print(output.message)
            return Ran(manifest, active.info.run_id, skipped=False)


def settings(node: DictConfig, leaving_out: tuple[str, ...] = (OPERATIONAL,)) -> dict[str, Any]:
    """A typed config node's settings (as plain values) less those whose role, declared on its schema's field
    (``pipelines.schema.operational``, ``run_extent``), is in ``leaving_out``."""
    schema = OmegaConf.get_type(node)
    if not is_dataclass(schema):
        raise TypeError(f"a config node of type {schema} has no schema class: compose the config with Hydra")
    role = roles(schema)
    return {k: v for k, v in plain(node).items() if role[k] not in leaving_out}


def stage_fingerprint(cfg: DictConfig, version: int, inputs: Iterable[str] = (), uses_task: bool = False) -> str:
    """The stage and data settings but the operational ones, the code's output version and the inputs'
    fingerprints; the task's identity for a stage whose output depends on it."""
    task = {"task": task_identity(cfg)} if uses_task else {}
    content = {"stage": settings(cfg.stage), "data": settings(cfg.data), "code_version": version, **task}
    return fingerprint(content, inputs)


def task_identity(cfg: DictConfig) -> str:
    """The task's name and the settings that change its model (a layout τθ's grid and boxes), not where its
    outputs go: ``layout_to_image[grid=16,max_objects=8]``."""
    model = settings(cfg.task, leaving_out=(OPERATIONAL, RUN_EXTENT))
    model.pop("name")
    return str(cfg.task.name) + (f"[{','.join(f'{k}={v}' for k, v in sorted(model.items()))}]" if model else "")


def require_reachable_storage(cfg: DictConfig, is_local: bool) -> None:
    """Refuse node-local storage on a multi-node cluster unless the user says every node mounts it."""
    if is_local and cfg.cluster.address != "local" and not cfg.storage.shared:
        raise ValueError(
            f"storage.root={cfg.storage.root} is a local path but cluster.address={cfg.cluster.address}: workers on "
            "other nodes would write to their own disks. Use storage=s3, or storage.shared=true if every node "
            "mounts this path (NFS, or a one-machine cluster)."
        )
