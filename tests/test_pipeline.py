"""stage=pipeline: the stages as one workflow on S3 and an MLflow server, killed mid-stage, resumed, then found
complete; a failing stage named; the plan for other data and a pretrained first stage."""

import json
import re
import subprocess
import sys
from collections import Counter

import mlflow
import pytest
from conftest import BUCKET, ROOT, console_noise, kill_when
from omegaconf import OmegaConf

from ldm.models.first_stage import build_first_stage
from ldm.models.presets import first_stage_preset
from ldm.storage import Storage
from pipelines import stages
from pipelines.driver.config import compose
from pipelines.stages.pipeline.stage import FROM_METADATA, ORDER, StageFailed, plan, stage_config

pytestmark = [pytest.mark.timeout(1500), pytest.mark.slow]

# The ci sizes, on fewer rows: the whole workflow in a few minutes.
TINY = ["experiment=ci", "data.num_samples=160", "stage.synthesize.rows_per_shard=40"]


def test_the_stages_run_with_their_own_config_and_the_plan_fits_the_data():
    pipeline = compose("stage=pipeline", "storage.root=/data/store", "stage.prepare.max_rows_per_file=7")
    # A stage in the pipeline has the config it has alone (so it finds the same outputs), plus the links.
    for name in ("prepare", "sample"):
        alone = compose(
            f"stage={name}", "storage.root=/data/store", *(["stage.max_rows_per_file=7"] if name == "prepare" else [])
        )
        assert stage_config(pipeline, name).stage == OmegaConf.to_container(alone.stage, resolve=True)
    linked = compose("stage=pipeline", "stage.train_ldm.output_url=s3://b/runs/ldm-7")
    assert {stage_config(linked, n).stage.model_url for n in ("sample", "evaluate", "export")} == {"s3://b/runs/ldm-7"}

    assert plan(pipeline) == [(name, None) for name in ORDER]
    pretrained = dict(plan(compose("stage=pipeline", "stage.encode_latents.first_stage=stabilityai/sd-vae-ft-mse")))
    assert "pretrained first stage stabilityai/sd-vae-ft-mse" in pretrained["train_autoencoder"]
    assert "not a synthesize output" in dict(plan(compose("stage=pipeline", "data=laion400m")))["synthesize"]
    from_metadata = plan(compose("stage=pipeline", "data=laion400m_metadata", "data.input.url=s3://b/meta"))
    assert [name for name, _ in from_metadata] == list(FROM_METADATA)
    assert FROM_METADATA[:5] == ("synthesize", "prepare metadata", "download", "prepare", "train_autoencoder")
    # prepare reads the metadata first, then what download wrote, as img2dataset names its columns.
    metadata = compose("stage=pipeline", "data=laion400m_metadata", "data.input.url=s3://b/meta", "storage.root=/s")
    assert stage_config(metadata, "prepare metadata").data.input.url_col == "URL"
    images = stage_config(metadata, "prepare").data
    assert (images.input.url, images.input.format, images.prepared_url) == (
        "/s/laion400m/images",
        "webdataset",
        "/s/laion400m/prepared",
    )
    assert (images.input.url_col, images.input.caption_col, images.input.similarity_col) == (
        "url",
        "caption",
        "similarity",
    )
    assert stage_config(metadata, "train_ldm").data.prepared_url == "/s/laion400m/prepared"


def test_a_failing_stage_is_named_and_the_stages_before_it_stay_complete(ray_cluster, tmp_path):
    tracking = f"sqlite:///{tmp_path}/mlruns.db"
    cfg = compose(
        "stage=pipeline",
        *TINY,
        f"storage.root={tmp_path}/store",
        f"tracking.uri={tracking}",
        f"stage.encode_latents.first_stage={tmp_path}/no-such-autoencoder",
    )
    with pytest.raises(StageFailed) as failure:
        stages.load("pipeline").run(cfg)
    message = str(failure.value)
    assert "stage encode_latents failed" in message and "no-such-autoencoder" in message
    assert (
        "Complete and kept: synthesize, prepare" in message and "the same command resumes at encode_latents" in message
    )
    assert (tmp_path / "store" / "prepared" / "_manifest.json").exists()
    client = mlflow.MlflowClient(tracking)
    [parent] = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id], "tags.stage = 'pipeline'"
    )
    assert parent.info.status == "FAILED" and parent.data.tags["failed_stage"] == "encode_latents"


def test_killed_mid_stage_it_resumes_there_skipping_the_stages_already_complete(s3_server, mlflow_server, tmp_path):
    command = [
        sys.executable,
        str(ROOT / "pipelines" / "run.py"),
        "stage=pipeline",
        *TINY,
        "storage=s3",
        f"storage.bucket={BUCKET}",
        "storage.prefix=pipeline",
        f"storage.endpoint_url={s3_server}",
        "tracking=server",
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=pipeline-test",
    ]
    storage = Storage(root=f"s3://{BUCKET}/pipeline", endpoint_url=s3_server)
    fs, root = storage.fsspec(storage.root)
    # Ray Train writes its snapshot once a reported checkpoint is registered: train_ldm is then mid-way.
    kill_when(
        command, tmp_path, lambda: bool(fs.glob(f"{root}/checkpoints/train_ldm/*/checkpoint_manager_snapshot.json"))
    )
    assert fs.exists(f"{root}/latents/_manifest.json") and not fs.exists(f"{root}/ldm/_manifest.json")

    # Its console as a file gets it, stdout and stderr together: the summary comes last, nothing after it.
    resumed = subprocess.run(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stdout[-5000:]
    assert all(fs.exists(f"{root}/{out}/_manifest.json") for out in ("ldm", "samples", "evaluation", "export"))
    lines = resumed.stdout.rstrip().splitlines()
    summary = lines[len(lines) - lines[::-1].index("pipeline: done") - 1 :]
    # The stage lines, where the samples and the model are, MLflow's own run links, and the run's URL last.
    assert len(summary) <= 16 and summary[-1].strip().startswith(f"open {mlflow_server}/#/experiments/"), "\n".join(
        summary
    )
    assert any(line.startswith(f"samples: s3://{BUCKET}/pipeline/samples/images/") for line in summary)
    assert any(line.startswith("prompt adherence on 8 held-out prompts x 3 seeds: colour ") for line in summary)
    assert not any(line.startswith("(") or "%|" in line for line in summary), "\n".join(summary)  # no Ray worker output
    # Both consoles together ran every stage, the training ones included: progress and results, no Ray chatter.
    consoles = (tmp_path / "killed-run.log").read_text() + resumed.stdout
    assert console_noise(consoles) == [], "\n".join(console_noise(consoles)[:20])
    assert re.search(r"train_ldm: step \d+/\d+ \(\d+%\), loss [\d.]+, [\d.]+ steps/s, \S+ left", consoles)

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("pipeline-test").experiment_id
    killed, second = sorted(
        client.search_runs([experiment], "tags.stage = 'pipeline'"), key=lambda r: r.info.start_time
    )
    children = lambda run: {  # noqa: E731
        r.data.tags["stage"]: r
        for r in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    }
    assert set(children(killed)) == {"synthesize", "prepare", "train_autoencoder", "encode_latents", "train_ldm"}
    assert second.info.status == "FINISHED" and set(children(second)) == set(ORDER)
    assert second.data.tags["stages_skipped"] == "synthesize,prepare,train_autoencoder,encode_latents"
    train_ldm = children(second)["train_ldm"]
    resumed_from = [m.value for m in client.get_metric_history(train_ldm.info.run_id, "resumed_from_step")]
    assert resumed_from and resumed_from[0] in (4, 8)


def test_from_metadata_through_a_real_http_server_to_an_exported_model_in_one_command(
    ray_cluster, corpus_server, tmp_path
):
    tracking = f"sqlite:///{tmp_path}/mlruns.db"
    # A first stage made beforehand (as a pretrained one would be): this test is about the data's way in.
    build_first_stage(first_stage_preset("tiny-kl-f4"), logvar_bias=-6.0).save_pretrained(tmp_path / "first_stage")
    overrides = [
        "stage=pipeline",
        *TINY,
        "data=synthetic_metadata",
        f"data.image_host={corpus_server.url}",
        f"storage.root={tmp_path}/store",
        f"tracking.uri={tracking}",
        "stage.download.timeout=2",
        "stage.download.retries=0",
        "stage.download.number_sample_per_shard=50",
        f"stage.encode_latents.first_stage={tmp_path}/first_stage",
    ]
    corpus_server.load_when_asked(tmp_path / "store" / "raw")  # synthesize, the pipeline's first step, writes it
    results = stages.load("pipeline").run(compose(*overrides))
    steps = [name for name in FROM_METADATA if name != "train_autoencoder"]
    assert list(results) == steps
    store = tmp_path / "store"
    download = json.loads((store / "images" / "_manifest.json").read_text())
    metadata = json.loads((store / "metadata-filtered" / "_manifest.json").read_text())
    prepared = json.loads((store / "prepared" / "_manifest.json").read_text())
    assert download["counts"]["rows"] == metadata["counts"]["rows_out"] == prepared["counts"]["rows_in"]
    assert 0 < download["counts"]["success"] < download["counts"]["rows"]  # the failed downloads failed
    assert prepared["inputs"]["fingerprint"] == download["fingerprint"]  # the images prepare read are the download's
    assert (store / "export" / "_manifest.json").exists()

    client = mlflow.MlflowClient(tracking)
    experiment = client.get_experiment_by_name("ldm").experiment_id
    [parent] = client.search_runs([experiment], "tags.stage = 'pipeline'")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert Counter(r.data.tags["stage"] for r in children) == Counter(
        {"prepare": 2, **{name: 1 for name in steps if name not in ("prepare", "prepare metadata")}}
    )

    # Other validation prompts: only what they are content of (sample's images) is made again. train_ldm's
    # grids are not its content, so the model and every other output stay complete.
    prompts = ["data.validation_prompts=['a red circle in the top left on a blue background']", "overwrite=true"]
    again = stages.load("pipeline").run(compose(*overrides, *prompts))
    assert [name for name, result in again.items() if not result["skipped"]] == ["sample"]
