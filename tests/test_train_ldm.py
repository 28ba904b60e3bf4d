"""stage=train_ldm on a real local Ray cluster: 2 Ray Train workers (DDP over gloo) on the tiny preset over
latents of synthesized images; MLflow gets params, metrics and sample grids; re-runs continue; a killed worker
is replaced from the last checkpoint; checkpoints land in S3. Each epoch's rows are trained on exactly once
across a killed worker, a killed run, and a restart with another worker count (read from the data audits)."""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import torch
from conftest import BUCKET, ROOT, free_port, history, image_steps, kill_session, kill_when, wait_for

from ldm.manifest import verify
from ldm.models.text_to_image import load_models
from ldm.storage import Storage
from pipelines import stages
from pipelines.driver.config import compose
from pipelines.worker.checkpoint import STATE_FILE

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

TRAIN = ["stage=train_ldm", "experiment=ci"]


@pytest.fixture(scope="module")
def latents(ci_latents):
    """Latents of 240 synthesized images under a random tiny first stage (the shared ci latents, whose root this
    module's outputs and MLflow runs share): the shape of the real thing."""
    return ci_latents, [f"storage.root={ci_latents}/store", f"tracking.uri=sqlite:///{ci_latents}/mlruns.db"]


def latest_run(client):
    experiment = client.get_experiment_by_name("ldm").experiment_id
    return client.search_runs([experiment], "tags.stage = 'train_ldm'", order_by=["start_time DESC"])[0]


@pytest.fixture(scope="module")
def uninterrupted(latents):
    """40 steps with the data audit on (about 3 epochs): what every interrupted run must reproduce."""
    root, common = latents
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns.db")
    manifest = stages.load("train_ldm").run(compose(*TRAIN, *common, "stage.steps=40", "stage.data_audit=true"))
    run = latest_run(client)
    return manifest, run, audit(client, [run.info.run_id], root / "audit")


def audit(client, run_ids, dest, resumed_at=None) -> dict[tuple[int, int], list[str]]:
    """(epoch, rank) -> the keys trained on, in order, from the data audits of ``run_ids`` (a run and the one that
    continued it). Segments of the earlier runs that end past ``resumed_at`` were rolled back by the restart."""
    segments = []
    for i, run_id in enumerate(run_ids):
        folder = client.download_artifacts(run_id, "data_audit", str(dest / str(i)))
        for epoch in sorted(os.listdir(folder)):
            for name in os.listdir(os.path.join(folder, epoch)):
                _, rank, _, first, last = (int(x) if x.isdigit() else x for x in name.removesuffix(".txt").split("-"))
                if i == len(run_ids) - 1 or last <= resumed_at:
                    keys = open(os.path.join(folder, epoch, name)).read().split()
                    segments.append((int(epoch.split("-")[1]), rank, first, last, keys))
    out: dict[tuple[int, int], list[str]] = {}
    for epoch, rank, _, _, keys in sorted(segments, key=lambda s: s[:4]):
        out.setdefault((epoch, rank), []).extend(keys)
    return out


def assert_same_rows_in_the_same_order(trained, reference, steps):
    """Every (epoch, rank) trained the reference's rows in its order, up to where either run stopped; none twice."""
    for (epoch, rank), keys in trained.items():
        assert len(set(keys)) == len(keys), (epoch, rank)
        if (epoch, rank) in reference:
            common = min(len(keys), len(reference[(epoch, rank)]))
            assert common and keys[:common] == reference[(epoch, rank)][:common], (epoch, rank)
    assert sum(len(k) for k in trained.values()) == steps * 16  # global batch 16
    complete = sorted({e for e, _ in trained} & {e for e, _ in reference})[:-1]
    assert complete and all(trained[(e, r)] == reference[(e, r)] for e in complete for r in (0, 1))


def test_two_workers_train_in_step_on_disjoint_data_and_log_to_mlflow(latents, uninterrupted):
    root, common = latents
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns.db")
    manifest, run, seen = uninterrupted

    losses = [v for _, v in history(client, run.info.run_id, "train/loss")]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]  # it learns
    assert [v for _, v in history(client, run.info.run_id, "ddp/parameter_spread")] == [0.0]  # replicas equal
    params = client.get_run(run.info.run_id).data.params
    assert params["global_batch_size"] == "16" and params["world_size"] == "2" and int(params["parameters.unet"]) > 1e6
    for key in (
        "train/samples_per_s",
        "train/data_wait_fraction",
        "train/grad_norm",
        "train/lr",
        "val/loss",
        "perf/mfu",
    ):
        assert [s for s, _ in history(client, run.info.run_id, key)] == [10, 20, 30, 40], key
    # Model FLOPs utilisation against this CPU's measured matmul peak: not a vanishing fraction (0.04-0.13 here).
    assert all(v > 0.001 for _, v in history(client, run.info.run_id, "perf/mfu"))
    assert image_steps(client, run.info.run_id, "samples") == [20, 40]  # a series the UI steps through
    held_out_loss = [v for _, v in history(client, run.info.run_id, "val/loss")]
    assert held_out_loss[-1] < held_out_loss[0]  # the same held-out rows and noise each time: the model improved
    # Each rank draws its own τθ dropout: torch's streams differ between ranks (they were equal, so every rank
    # dropped the same units), and the checkpoint keeps every rank's.
    [rank0_rng, rank1_rng] = torch.load(_checkpoints(manifest)[-1] / STATE_FILE, weights_only=True)["rng"]
    assert rank0_rng["device"] == rank1_rng["device"] == "cpu" and not torch.equal(rank0_rng["cpu"], rank1_rng["cpu"])

    # Each worker trained on its own part of the latents: an epoch's keys are disjoint between ranks, and each
    # epoch is another order of the same rows.
    rank0, rank1 = set(seen[(0, 0)]), set(seen[(0, 1)])
    assert rank0 and rank1 and not rank0 & rank1
    latent_keys = set(pq.read_table(root / "store" / "latents" / "shards", columns=["key"])["key"].to_pylist())
    assert len(latent_keys) - len(rank0 | rank1) < 16 and rank0 | rank1 <= latent_keys
    assert seen[(1, 0)] != seen[(0, 0)] and set(seen[(1, 0)] + seen[(1, 1)]) <= latent_keys
    # ... and none of prepare's held-out rows, which evaluate measures the model on.
    held_out = set(pq.read_table(root / "store" / "prepared" / "held_out", columns=["key"])["key"].to_pylist())
    assert held_out and not held_out & (rank0 | rank1)

    # The output: UNet, τθ and their EMA load back; the manifest carries what sampling needs.
    verify(Storage(root=str(root)), f"{root}/store/ldm", stage="train_ldm")
    unet, text_encoder = load_models(f"{root}/store/ldm")
    ema_unet, _ = load_models(f"{root}/store/ldm/ema")
    assert unet.config.in_channels == 4 and unet.config.sample_size == 16
    assert any(not torch.equal(a, b) for a, b in zip(unet.parameters(), ema_unet.parameters()))
    facts = manifest["facts"]
    assert facts["scale_factor"] > 0 and facts["latent_shape"] == [4, 16, 16] and manifest["counts"]["steps"] == 40
    assert (root / "store" / "ldm" / "tokenizer" / "tokenizer.json").exists()


def test_resume_from_a_checkpoint_with_another_worker_count_finishes_the_epoch_on_the_rows_left(latents, uninterrupted):
    """stage.resume=<the uninterrupted run's step-20 checkpoint, mid-epoch> with 1 worker instead of 2: a new run
    that continues the step count and the EMA, and finishes the epoch on the rows the two workers had not reached,
    each once; only the last few (fewer than a global batch) wait for the next epoch."""
    root, common = latents
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns.db")
    manifest, run, _ = uninterrupted
    checkpoint = next(c for c in _checkpoints(manifest) if torch.load(c / STATE_FILE, weights_only=True)["step"] == 20)
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    epoch, taken = state["epoch"], sum(b - a for a, b in state["data"]["taken"])
    latent_keys = set(pq.read_table(root / "store" / "latents" / "shards", columns=["key"])["key"].to_pylist())
    assert 0 < taken < len(latent_keys)  # mid-epoch
    steps = 20 + (len(latent_keys) - taken) // 8
    resumed = stages.load("train_ldm").run(
        compose(
            *TRAIN,
            *common,
            "stage.output_url=${storage.root}/ldm-resume",
            "stage.data_audit=true",
            f"stage.steps={steps}",
            f"stage.resume={checkpoint}",
            "stage.scaling.num_workers=1",
        )
    )
    new = latest_run(client)
    assert new.info.run_id != run.info.run_id and [
        v for _, v in history(client, new.info.run_id, "resumed_from_step")
    ] == [20.0]
    assert resumed["counts"]["steps"] == steps and resumed["facts"]["checkpoints"] != manifest["facts"]["checkpoints"]
    last = _checkpoints(resumed)[-1]
    assert (
        torch.load(last / STATE_FILE, weights_only=True)["ema"]["optimization_step"] == steps
    )  # the EMA went on counting

    assert sorted(audit(client, [new.info.run_id], root / "audit-resume-new")) == [(epoch, 0)]
    both = audit(client, [run.info.run_id, new.info.run_id], root / "audit-resume", resumed_at=20)
    trained = both[(epoch, 0)] + both[(epoch, 1)]
    assert len(set(trained)) == len(trained) and set(trained) <= latent_keys and len(latent_keys - set(trained)) < 8


def test_a_checkpoint_written_on_gpus_resumes_on_cpu_workers(latents, uninterrupted, tmp_path):
    """stage.resume= a checkpoint whose random states are CUDA's (a generator's 16 bytes, not a CPU one's 5,056), as
    a GPU run writes it: the CPU workers continue its step, weights and data position with fresh random streams."""
    root, common = latents
    manifest, _, _ = uninterrupted
    source = next(c for c in _checkpoints(manifest) if torch.load(c / STATE_FILE, weights_only=True)["step"] == 20)
    checkpoint = tmp_path / source.name
    shutil.copytree(source, checkpoint)
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    state["rng"] = [
        {
            **r,
            "device": "cuda",
            "cuda": torch.zeros(16, dtype=torch.uint8),
            "generator": torch.zeros(16, dtype=torch.uint8),
        }
        for r in state["rng"]
    ]
    torch.save(state, checkpoint / STATE_FILE)
    resumed = stages.load("train_ldm").run(
        compose(
            *TRAIN,
            *common,
            f"stage.output_url={tmp_path}/ldm",
            f"stage.checkpoints_url={tmp_path}/ckpt",
            "stage.steps=24",
            f"stage.resume={checkpoint}",
        )
    )
    assert resumed["counts"]["steps"] == 24
    assert torch.load(_checkpoints(resumed)[-1] / STATE_FILE, weights_only=True)["rng"][0]["generator"].numel() == 5056


def test_a_killed_worker_restarts_from_the_last_checkpoint_in_s3_and_trains_each_row_once(
    latents, uninterrupted, s3_server, tmp_path
):
    root, common = latents
    s3 = ["storage=s3", f"storage.bucket={BUCKET}", "storage.prefix=train-ldm", f"storage.endpoint_url={s3_server}"]
    cfg = compose(
        *TRAIN,
        *s3,
        f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
        f"stage.latents_url={root}/store/latents",
        "stage.steps=60",
        "stage.checkpoint_every=7",
        "stage.data_audit=true",
    )
    killed = []

    def kill_a_worker_after_two_checkpoints():
        deadline = time.time() + 300
        while time.time() < deadline and logged_step(tmp_path / "mlruns.db") < 20:
            time.sleep(0.2)
        for pid in _train_worker_pids():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            break

    killer = threading.Thread(target=kill_a_worker_after_two_checkpoints)
    killer.start()
    manifest = stages.load("train_ldm").run(cfg)
    killer.join()
    assert killed, "no Ray Train worker was found to kill"
    assert manifest["counts"]["steps"] == 60
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    run = latest_run(client)
    resumed = [v for _, v in history(client, run.info.run_id, "resumed_from_step")]
    assert resumed and 7 <= resumed[0] < 60 and resumed[0] % 7 == 0
    # Resumed mid-epoch (10 steps an epoch), yet every rank trained on its rows of each epoch in the order of the
    # uninterrupted run, none twice and none skipped.
    assert_same_rows_in_the_same_order(audit(client, [run.info.run_id], tmp_path / "audit"), uninterrupted[2], steps=60)
    storage = Storage(root=f"s3://{BUCKET}/train-ldm", endpoint_url=s3_server)
    fs, path = storage.fsspec(manifest["facts"]["checkpoints"])
    names = sorted(
        p.rsplit("/", 1)[-1]
        for p in fs.ls(path)
        if p.rsplit("/", 1)[-1].startswith("checkpoint_") and not p.endswith(".json")
    )
    # Of the 9 written, keep_checkpoints' 3 latest (Ray Train sometimes keeps the one a restart restored from too).
    assert 3 <= len(names) <= 4
    with fs.open(f"{path}/{names[-1]}/{STATE_FILE}", "rb") as f:
        assert torch.load(f, weights_only=True)["step"] == 60
    assert fs.exists(f"{path}/{names[-1]}/unet/diffusion_pytorch_model.safetensors")
    fs_out, out = storage.fsspec(storage.url("ldm"))
    assert fs_out.exists(f"{out}/_manifest.json") and fs_out.exists(
        f"{out}/ema/unet/diffusion_pytorch_model.safetensors"
    )


def test_the_same_command_after_the_whole_run_is_killed_trains_each_row_once(latents, uninterrupted, tmp_path):
    root, _ = latents
    command = [
        sys.executable,
        str(ROOT / "pipelines" / "run.py"),
        *TRAIN,
        f"storage.root={tmp_path}/store",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
        f"stage.latents_url={root}/store/latents",
        "stage.steps=40",
        "stage.checkpoint_every=7",
        "stage.log_every=5",
        "stage.data_audit=true",
    ]
    kill_when(command, tmp_path, lambda: logged_step(tmp_path / "mlruns.db") >= 15)  # checkpoints 7 and 14 are written
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "train_ldm: 40 steps" in result.stdout

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    killed, rerun = client.search_runs(
        [client.get_experiment_by_name("ldm").experiment_id], "tags.stage = 'train_ldm'", order_by=["start_time ASC"]
    )
    resumed = [v for _, v in history(client, rerun.info.run_id, "resumed_from_step")]
    assert resumed and 7 <= resumed[0] < 40 and resumed[0] % 7 == 0  # the re-run continued mid-epoch
    trained = audit(client, [killed.info.run_id, rerun.info.run_id], tmp_path / "audit", resumed_at=resumed[0])
    assert_same_rows_in_the_same_order(trained, uninterrupted[2], steps=40)


def test_ray_job_submit_trains_across_two_nodes_of_a_ray_start_cluster(latents, tmp_path):
    """The command users type, against `ray start --head` plus a second `ray start` node on 127.0.0.1."""
    root, _ = latents
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    gcs, dashboard = free_port(), free_port()

    def node() -> list[str]:
        ports = ["node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc"]
        ports += ["metrics-export", "runtime-env-agent"]
        options = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats", "--block"]
        return options + [arg for name in ports for arg in (f"--{name}-port", str(free_port()))]

    ray_cli = os.path.join(bin_dir, "ray")
    head = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--head",
            "--port",
            str(gcs),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard),
            "--ray-client-server-port",
            str(free_port()),
            "--include-dashboard",
            "true",
            *node(),
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker = None
    try:
        wait_for(f"http://127.0.0.1:{dashboard}/api/version", timeout=120, process=head)
        worker = subprocess.Popen(
            [ray_cli, "start", "--address", f"127.0.0.1:{gcs}", *node()],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        command = [
            ray_cli,
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{dashboard}",
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            "pipelines/run.py",
            "stage=train_ldm",
            "experiment=ci",
            "cluster=remote",
            f"storage.root={tmp_path}/store",
            "storage.shared=true",
            f"stage.latents_url={root}/store/latents",
            f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
            "stage.scaling.placement_strategy=SPREAD",
            "stage.steps=4",
        ]
        deadline = time.time() + 120
        while True:  # the job agent needs a few seconds after the dashboard answers, and both nodes must be up
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in result.stderr + result.stdout or time.time() > deadline:
                break
            time.sleep(3)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        assert "train_ldm: 4 steps" in result.stdout
    finally:
        for process in (worker, head):
            if process is not None:
                kill_session(process.pid)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    params = client.get_run(latest_run(client).info.run_id).data.params
    assert params["nodes"] == "2" and params["world_size"] == "2"  # one worker per node, DDP across them
    verify(Storage(root=str(tmp_path)), f"{tmp_path}/store/ldm", stage="train_ldm")


def logged_step(database) -> int:
    """The last step a train_ldm run has logged its loss at (read straight from the sqlite file, which the run
    under test may still be creating): checkpoints before it are written."""
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT max(step) FROM metrics WHERE key = 'train/loss'").fetchone()[0] or 0
    except sqlite3.Error:
        return 0


def _checkpoints(manifest) -> list[Path]:
    """A local run's checkpoint folders, oldest first (not Ray Train's checkpoint_manager_snapshot.json)."""
    return sorted(p for p in Path(manifest["facts"]["checkpoints"]).glob("checkpoint_*") if p.is_dir())


def _train_worker_pids() -> list[int]:
    """This test process's Ray Train workers (its local cluster's processes descend from it), not another's."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"RayTrainWorker" in f.read() and _descends_from(int(entry), os.getpid()):
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return False
