"""stage=pipeline: the stages as one workflow on S3 and an MLflow server, killed mid-stage, resumed, then found
complete; a failing stage named; the plan for other data and a pretrained first stage."""

import subprocess
import sys

import mlflow
import pytest
from conftest import BUCKET, ROOT, kill_when
from omegaconf import OmegaConf

from ldm.storage import Storage
from pipelines import stages
from pipelines.config import compose
from pipelines.stages.pipeline.stage import ORDER, StageFailed, plan, stage_config

pytestmark = [pytest.mark.timeout(1500), pytest.mark.slow]

# The ci sizes, on fewer rows: the whole workflow in a few minutes.
TINY = ["experiment=ci", "data.num_samples=160", "stage.synthesize.rows_per_shard=40"]


def test_the_stages_run_with_their_own_config_and_the_plan_fits_the_data():
    pipeline = compose("stage=pipeline", "storage.root=/data/store", "stage.prepare.max_rows_per_file=7")
    # A stage in the pipeline has the config it has alone (so it finds the same outputs), plus the links.
    for name in ("prepare", "sample"):
        alone = compose(f"stage={name}", "storage.root=/data/store", *(["stage.max_rows_per_file=7"] if name == "prepare" else []))
        assert stage_config(pipeline, name).stage == OmegaConf.to_container(alone.stage, resolve=True)
    linked = compose("stage=pipeline", "stage.train_ldm.output_url=s3://b/runs/ldm-7")
    assert {stage_config(linked, n).stage.model_url for n in ("sample", "evaluate", "export")} == {"s3://b/runs/ldm-7"}

    assert plan(pipeline) == [(name, None) for name in ORDER]
    pretrained = dict(plan(compose("stage=pipeline", "stage.encode_latents.first_stage=stabilityai/sd-vae-ft-mse")))
    assert "pretrained first stage stabilityai/sd-vae-ft-mse" in pretrained["train_autoencoder"]
    assert "not a synthesize output" in dict(plan(compose("stage=pipeline", "data=laion400m")))["synthesize"]
    with pytest.raises(ValueError, match="img2dataset command it prints"):
        plan(compose("stage=pipeline", "data=laion400m_metadata"))


def test_a_failing_stage_is_named_and_the_stages_before_it_stay_complete(ray_cluster, tmp_path):
    tracking = f"sqlite:///{tmp_path}/mlruns.db"
    cfg = compose("stage=pipeline", *TINY, f"storage.root={tmp_path}/store", f"tracking.uri={tracking}",
                  f"stage.encode_latents.first_stage={tmp_path}/no-such-autoencoder")
    with pytest.raises(StageFailed) as failure:
        stages.load("pipeline").run(cfg)
    message = str(failure.value)
    assert "stage encode_latents failed" in message and "no-such-autoencoder" in message
    assert "Complete and kept: synthesize, prepare" in message and "the same command resumes at encode_latents" in message
    assert (tmp_path / "store" / "prepared" / "_manifest.json").exists()
    client = mlflow.MlflowClient(tracking)
    [parent] = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id], "tags.stage = 'pipeline'")
    assert parent.info.status == "FAILED" and parent.data.tags["failed_stage"] == "encode_latents"


def test_killed_mid_stage_it_resumes_there_and_then_finds_every_stage_complete(s3_server, mlflow_server, tmp_path):
    command = [
        sys.executable, str(ROOT / "pipelines" / "run.py"), "stage=pipeline", *TINY,
        "storage=s3", f"storage.bucket={BUCKET}", "storage.prefix=pipeline", f"storage.endpoint_url={s3_server}",
        "tracking=server", f"tracking.uri={mlflow_server}", "tracking.experiment=pipeline-test",
    ]
    storage = Storage(root=f"s3://{BUCKET}/pipeline", endpoint_url=s3_server)
    fs, root = storage.fsspec(storage.root)
    # Ray Train writes its snapshot once a reported checkpoint is registered: train_ldm is then mid-way.
    kill_when(command, tmp_path, lambda: bool(fs.glob(f"{root}/checkpoints/train_ldm/*/checkpoint_manager_snapshot.json")))
    assert fs.exists(f"{root}/latents/_manifest.json") and not fs.exists(f"{root}/ldm/_manifest.json")

    # Its console as a file gets it, stdout and stderr together: the summary comes last, nothing after it.
    resumed = subprocess.run(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-5000:]
    assert all(fs.exists(f"{root}/{out}/_manifest.json") for out in ("ldm", "samples", "evaluation", "export"))
    lines = resumed.stdout.rstrip().splitlines()
    summary = lines[len(lines) - lines[::-1].index("pipeline: done") - 1:]
    # The stage lines, where the samples and the model are, MLflow's own run links, and the run's URL last.
    assert len(summary) <= 16 and summary[-1].strip().startswith(f"open {mlflow_server}/#/experiments/"), "\n".join(summary)
    assert any(line.startswith(f"samples: s3://{BUCKET}/pipeline/samples/images/") for line in summary)
    assert any(line.startswith("prompt adherence on 8 held-out prompts x 3 seeds: colour ") for line in summary)
    assert not any(line.startswith("(") or "%|" in line for line in summary), "\n".join(summary)  # no Ray worker output

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("pipeline-test").experiment_id
    killed, second, third = sorted(client.search_runs([experiment], "tags.stage = 'pipeline'"), key=lambda r: r.info.start_time)
    children = lambda run: {  # noqa: E731
        r.data.tags["stage"]: r for r in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run.info.run_id}'")}
    assert set(children(killed)) == {"synthesize", "prepare", "train_autoencoder", "encode_latents", "train_ldm"}
    assert second.info.status == "FINISHED" and set(children(second)) == set(ORDER)
    assert second.data.tags["stages_skipped"] == "synthesize,prepare,train_autoencoder,encode_latents"
    train_ldm = children(second)["train_ldm"]
    resumed_from = [m.value for m in client.get_metric_history(train_ldm.info.run_id, "resumed_from_step")]
    assert resumed_from and resumed_from[0] in (4, 8)
    assert third.data.tags["stages_run"] == "none"
    assert all("skipped" in run.data.tags for run in children(third).values()) and set(children(third)) == set(ORDER)
