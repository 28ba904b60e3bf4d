"""stage=pipeline: synthesize → prepare → train_autoencoder → encode_latents → train_ldm → sample → evaluate →
export, as one workflow in one process, one Ray cluster and one MLflow parent run. From metadata (a list of URLs,
``data.input.format=metadata``) prepare runs twice: prepare (the metadata) → download → prepare (the images it
downloaded, as ``data.images_url`` into ``data.images_prepared_url``) → train_autoencoder → ...

Each stage runs as ``python pipelines/run.py stage=<name>`` would, with the node ``stage.<name>`` of this
config, and is an MLflow run nested under the pipeline's. Each output's manifest holds the fingerprint of the
config that made it (``pipelines/driver/stage.py``), so a stage whose output is complete for its config is skipped, a
failure leaves every earlier output complete, and the same command again resumes at the stage that failed
(prepare and encode_latents file by file, the training stages from their last checkpoint). A complete output of
another config is replaced only with ``overwrite=true``.

It is the one stage without an output of its own, so it uses only the skeleton's MLflow run: its children
are the stages. Before the summary it stops the Ray cluster it started, so that nothing a Ray worker still has
to print comes after the summary.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import mlflow
from omegaconf import DictConfig, OmegaConf

from ldm.data.download import downloaded_input
from ldm.data.sources import Columns
from ldm.manifest import read_manifest
from ldm.metrics.adherence import headline
from ldm.storage import Storage, resolve
from pipelines import stages
from pipelines.driver import cluster
from pipelines.driver.config import plain
from pipelines.driver.tracking import stage_run
from pipelines.stages.sample import stage as sample

STAGE = "pipeline"
ORDER = ("synthesize", "prepare", "train_autoencoder", "encode_latents", "train_ldm", "sample", "evaluate", "export")
# From metadata: the steps before "prepare" see the metadata as data; "prepare" and the rest see the downloads.
METADATA_STEPS = {"prepare metadata": "prepare", "download": "download"}
FROM_METADATA = ("synthesize", *METADATA_STEPS, *ORDER[1:])


class StageFailed(RuntimeError):
    """A stage of the pipeline raised; the message names it and what is already complete."""


def plan(cfg: DictConfig) -> list[tuple[str, str | None]]:
    """Every step in order with the reason it does not apply to this config, or None if it runs."""
    settings = cfg.stage
    # Synthesize when prepare reads what it writes: a synthetic corpus is made, real data only read.
    synthesized = "raw_url" in cfg.data and resolve(cfg.data.input.url) == resolve(cfg.data.raw_url)
    trained_first_stage = resolve(settings.train_autoencoder.output_url)
    reasons = {
        "synthesize": None if synthesized else f"data.input.url={cfg.data.input.url} is not a synthesize output",
        "train_autoencoder": None
        if resolve(settings.encode_latents.first_stage) == trained_first_stage
        else f"encode_latents uses the pretrained first stage {settings.encode_latents.first_stage}",
    }
    steps = FROM_METADATA if from_metadata(cfg) else ORDER
    return [(name, reasons.get(name)) for name in steps]


def from_metadata(cfg: DictConfig) -> bool:
    return cfg.data.input.format == "metadata"


def stage_config(cfg: DictConfig, step: str) -> DictConfig:
    """The config ``stage=<name>`` for a step, with this pipeline's settings: its node (typed as when the stage
    runs alone), resolved here because it links to other stages' nodes (``${stage.train_ldm.output_url}``),
    which the stage's own config does not have. From metadata, the steps from the second prepare on get the
    downloads as their data."""
    stage_cfg = copy.deepcopy(cfg)
    OmegaConf.resolve(stage_cfg)
    stage_cfg.stage = stage_cfg.stage[METADATA_STEPS.get(step, step)]
    if from_metadata(cfg) and step not in METADATA_STEPS and step != "synthesize":
        download = cfg.stage.download
        columns = Columns.from_config(plain(stage_cfg.data.input))
        for key, value in downloaded_input(columns, str(download.output_format), str(download.encode_format)).items():
            stage_cfg.data.input[key] = value
        stage_cfg.data.input.url = stage_cfg.data.images_url
        stage_cfg.data.prepared_url = stage_cfg.data.images_prepared_url
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
                ran = stages.load(METADATA_STEPS.get(name, name)).run(stage_config(cfg, name))
            except Exception as error:
                mlflow.set_tag("failed_stage", name)
                complete = ", ".join(results) or "none"
                raise StageFailed(
                    f"{STAGE}: stage {name} failed: {type(error).__name__}: {error}\n"
                    f"Complete and kept: {complete}. Once the cause is fixed, the same command resumes at {name}."
                ) from error
            minutes = round((time.perf_counter() - started) / 60, 2)
            results[name] = {"skipped": ran.skipped, "minutes": minutes, "run_id": ran.run_id}
            mlflow.log_metric(f"minutes.{name}", results[name]["minutes"])

        ran = [name for name, result in results.items() if not result["skipped"]]
        mlflow.set_tags(
            {
                "stages_run": ",".join(ran) or "none",
                "stages_skipped": ",".join(n for n in results if n not in ran) or "none",
            }
        )
        cluster.disconnect()
        _print_summary(cfg, results)
    return results


def _print_summary(cfg: DictConfig, results: dict[str, dict[str, Any]]) -> None:
    print(f"\n{STAGE}: done")
    for name, result in results.items():
        done = "complete already, skipped" if result["skipped"] else f"{result['minutes']:.1f} min"
        print(f"  {name:<18} {done}")
    storage = Storage.from_config(cfg.storage)
    if "evaluate" in results:
        # Complete, whether it ran now or before: its manifest holds the metrics.
        metrics = read_manifest(storage, resolve(cfg.stage.evaluate.output_url))["facts"]["metrics"]
        for group, scores in metrics.items():
            if group == "adherence":
                print(f"prompt adherence on {headline(scores)}")
            elif group not in ("reconstruction", "fid"):  # the task's own metric
                print(f"{group}: " + ", ".join(f"{k} {v:.3g}" for k, v in scores.items()))
    samples = resolve(cfg.stage.sample.output_url)
    print(f"samples: {samples}/{sample.IMAGES}/ (grid: {samples}/{sample.GRID})")
    if "export" in results:
        model = resolve(cfg.stage.export.output_url)
        exported = read_manifest(storage, model)["facts"]
        print(f"model:   {model} (a {exported['pipeline']}: {exported['load_with']}.from_pretrained)")
