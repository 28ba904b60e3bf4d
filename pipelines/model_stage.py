"""What stage=sample, stage=evaluate and stage=export share: a train_ldm output in, one output of their own.

The model's manifest is checked before anything starts, the output is addressed by the stage config and the
model's fingerprint (so the same command again finds it complete), and the manifest is written last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import mlflow
from diffusers import LDMTextToImagePipeline
from omegaconf import DictConfig

from ldm.diffusion.sampling import load_pipeline
from ldm.manifest import verify, write_manifest
from ldm.storage import Storage, resolve
from pipelines.outputs import claim_or_skip, stage_fingerprint
from pipelines.tracking import stage_run


@dataclass
class ModelJob:
    cfg: DictConfig
    storage: Storage
    model_url: str
    trained: dict[str, Any]  # the train_ldm manifest
    out: str

    @property
    def settings(self) -> DictConfig:
        return self.cfg.stage

    def pipeline(self) -> LDMTextToImagePipeline:
        settings = self.settings
        return load_pipeline(self.storage, self.model_url, weights=settings.weights, sampler_name=settings.sampler,
                             device=settings.get("device", "cpu"))


def run_on_model(cfg: DictConfig, stage: str, version: int, work: Callable[[ModelJob], dict[str, Any]],
                 check: Callable[[ModelJob], None] | None = None, detail: str = "") -> dict[str, Any]:
    """``check(job)`` refuses bad input before a run starts; ``work(job)`` writes the output's files and returns
    the manifest's ``counts`` / ``facts`` / ``timings``, which get the seconds taken."""
    storage = Storage.from_config(cfg.storage)
    model_url = resolve(cfg.stage.model_url)
    job = ModelJob(cfg, storage, model_url, verify(storage, model_url, stage="train_ldm"), resolve(cfg.stage.output_url))
    if check is not None:
        check(job)
    identity = stage_fingerprint(cfg, version, [job.trained["fingerprint"]])
    with stage_run(cfg, stage):
        done = claim_or_skip(cfg, storage, job.out, stage, identity, detail=detail)
        if done is not None:
            return done
        started = time.time()
        result = work(job)
        timings = {"seconds": round(time.time() - started, 3), **result.pop("timings", {})}
        manifest = write_manifest(storage, job.out, stage=stage, fingerprint=identity, timings=timings,
                                  inputs={"model": model_url, "fingerprint": job.trained["fingerprint"]}, **result)
        mlflow.log_dict(manifest, "manifest.json")
        return manifest
