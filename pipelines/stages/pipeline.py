"""stage=pipeline: synthesize → prepare → train_autoencoder → encode_latents → train_ldm → sample → evaluate →
export, as one workflow in one process, one Ray cluster and one MLflow parent run.

Each stage runs as ``python pipelines/run.py stage=<name>`` would, with the node ``stage.<name>`` of this
config, and is an MLflow run nested under the pipeline's. Outputs are addressed by their config fingerprint
(``pipelines/outputs.py``), so a stage whose output is complete is skipped, a failure leaves every earlier output
complete, and the same command again resumes at the stage that failed (prepare and encode_latents file by file,
the training stages from their last checkpoint).
"""

from __future__ import annotations

import time
from typing import Any

import mlflow
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm.storage import resolve
from pipelines import stages
from pipelines.stages import sample
from pipelines.tracking import stage_run

STAGE = "pipeline"
ORDER = ("synthesize", "prepare", "train_autoencoder", "encode_latents", "train_ldm", "sample", "evaluate", "export")


class StageFailed(RuntimeError):
    """A stage of the pipeline raised; the message names it and what is already complete."""


def plan(cfg: DictConfig) -> list[tuple[str, str | None]]:
    """Every stage in order with the reason it does not apply to this config, or None if it runs."""
    if cfg.data.input.format == "metadata":
        raise ValueError(
            f"data={cfg.data.name} prepares LAION metadata for img2dataset; the pipeline starts from images. Run "
            f"stage=prepare data={cfg.data.name}, then the img2dataset command it prints, then stage=pipeline on "
            "the downloads (data=laion400m)."
        )
    settings = cfg.stage
    trained_first_stage = resolve(settings.train_autoencoder.output_url)
    reasons = {
        "synthesize": None if cfg.data.get("synthesized", False) else f"data={cfg.data.name} is not synthetic",
        "train_autoencoder": None if resolve(settings.encode_latents.first_stage) == trained_first_stage
        else f"encode_latents uses the pretrained first stage {settings.encode_latents.first_stage}",
    }
    return [(name, reasons.get(name)) for name in ORDER]


def stage_config(cfg: DictConfig, name: str) -> DictConfig:
    """The config ``stage=<name>`` with this pipeline's settings: its node, resolved here because it links to
    other stages' nodes (``${stage.train_ldm.output_url}``), which the stage's own config does not have."""
    stage_cfg = cfg.copy()
    with open_dict(stage_cfg):
        stage_cfg.stage = OmegaConf.to_container(cfg.stage[name], resolve=True)
    return stage_cfg


def run(cfg: DictConfig) -> dict[str, Any]:
    steps = plan(cfg)
    runs = [name for name, reason in steps if reason is None]
    results: dict[str, dict[str, Any]] = {}
    with stage_run(cfg, STAGE):
        for name, reason in steps:
            if reason is not None:
                print(f"{STAGE}: {name} does not apply: {reason}")
                continue
            print(f"\n{STAGE}: [{runs.index(name) + 1}/{len(runs)}] {name}", flush=True)
            started = time.perf_counter()
            try:
                stages.load(name).run(stage_config(cfg, name))
            except Exception as error:
                mlflow.set_tag("failed_stage", name)
                complete = ", ".join(results) or "none"
                raise StageFailed(
                    f"{STAGE}: stage {name} failed: {type(error).__name__}: {error}\n"
                    f"Complete and kept: {complete}. Run the same command again to resume at {name}."
                ) from error
            child = mlflow.last_active_run()
            skipped = child.data.tags.get("stage") == name and "skipped" in child.data.tags
            results[name] = {"skipped": skipped, "minutes": round((time.perf_counter() - started) / 60, 2), "run_id": child.info.run_id}
            mlflow.log_metric(f"minutes.{name}", results[name]["minutes"])

        ran = [name for name, result in results.items() if not result["skipped"]]
        mlflow.set_tags({"stages_run": ",".join(ran) or "none",
                         "stages_skipped": ",".join(n for n in results if n not in ran) or "none"})
        _print_summary(cfg, results)
    return results


def _print_summary(cfg: DictConfig, results: dict[str, dict[str, Any]]) -> None:
    print(f"\n{STAGE}: done")
    for name, result in results.items():
        done = "complete already, skipped" if result["skipped"] else f"{result['minutes']:.1f} min"
        print(f"  {name:<18} {done}")
    samples = resolve(cfg.stage.sample.output_url)
    print(f"samples: {samples}/{sample.IMAGES}/ (grid: {samples}/{sample.GRID})")
    print(f"model:   {resolve(cfg.stage.export.output_url)} (diffusers: DiffusionPipeline.from_pretrained)")
