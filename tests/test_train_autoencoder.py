"""stage=train_autoencoder on a real local Ray cluster: 2 Ray Train workers (DDP over gloo) on synthesized,
prepared images; the loss falls, the replicas (discriminator included) stay equal past disc_start, MLflow sees
metrics and reconstruction grids, a longer re-run resumes from the checkpoint, the saved model reloads, and the
VQ path works too."""

import mlflow
import numpy as np
import pytest
import torch
from conftest import history, image_steps, write_lpips_weights

from ldm.data.images import encode_png, normalise
from ldm.manifest import verify
from ldm.models.first_stage import load_first_stage
from ldm.storage import Storage
from pipelines import stages
from pipelines.driver.config import compose
from pipelines.stages.train_autoencoder import remote

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

TRAIN = ["stage=train_autoencoder", "experiment=ci"]


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("autoencoder")
    common = [f"storage.root={root}/store", f"tracking.uri=sqlite:///{root}/mlruns.db"]
    stages.load("synthesize").run(compose("stage=synthesize", "experiment=ci", *common))
    stages.load("prepare").run(compose("stage=prepare", "experiment=ci", *common))
    return root, common


def test_two_workers_learn_log_and_save_a_reloadable_model(prepared):
    root, common = prepared
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns.db")
    experiment = client.get_experiment_by_name("ldm").experiment_id

    # The discriminator starts at step 16: from then on its replicas train too, and must stay equal.
    train = [*TRAIN, *common, "stage.loss.disc_start=16"]
    first = stages.load("train_autoencoder").run(compose(*train, "stage.steps=32"))
    [run] = client.search_runs([experiment], "tags.stage = 'train_autoencoder'")
    losses = [v for _, v in history(client, run.info.run_id, "train/rec_loss")]
    assert len(losses) == 4 and losses[-1] < losses[0]  # two workers, and it learns
    assert [v for _, v in history(client, run.info.run_id, "ddp/parameter_spread")] == [0.0]
    assert "train/disc_loss" in first["facts"]["final_metrics"]
    # Model FLOPs utilisation at every log step, against this CPU's measured matmul peak; the step is counted
    # again once the discriminator trains.
    tflops = [v for _, v in history(client, run.info.run_id, "perf/model_tflops")]
    assert len(tflops) == 4 and all(v > 0 for v in tflops) and first["facts"]["final_metrics"]["perf/mfu"] > 0
    # Validated on prepare's held-out rows, which it never trained on: as many as stage.validation_images allows.
    held_out = first["facts"]["held_out"]
    assert held_out["fraction"] == 0.15 and first["facts"]["final_metrics"]["val/images"] == 8 < held_out["rows"]
    psnr = history(client, run.info.run_id, "val/psnr")
    assert [s for s, _ in psnr] == [16, 32] and psnr[-1][1] > 0
    assert image_steps(client, run.info.run_id, "reconstructions") == [16, 32]  # a series the UI steps through
    scenes = history(client, run.info.run_id, "val/scene_colour")
    assert [s for s, _ in scenes] == [16, 32] and all(0 <= v <= 1 for _, v in scenes)
    assert first["counts"]["steps"] == 32 and first["facts"]["kind"] == "kl" and first["facts"]["factor"] == 4

    storage = Storage(root=str(root))
    verify(storage, f"{root}/store/autoencoder", stage="train_autoencoder")
    model = load_first_stage(f"{root}/store/autoencoder/model")
    checkpoint_dir = sorted(
        p for p in (root / "store" / "checkpoints" / "train_autoencoder").glob("*/checkpoint_*") if p.is_dir()
    )[-1]
    from_checkpoint = load_first_stage(str(checkpoint_dir / "model"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), from_checkpoint.state_dict().values()))
    assert sum(p.numel() for p in model.parameters()) == first["facts"]["parameters"] == 954_567

    again = stages.load("train_autoencoder").run(compose(*train, "stage.steps=32"))
    assert again["created_at"] == first["created_at"]  # same config: nothing to do


def test_a_run_resumed_mid_epoch_ends_with_the_weights_of_one_that_never_stopped(prepared):
    """Exact resume (the same command with more steps continues from the last checkpoint): the same rows in the
    same order with the same crops and posterior noise on every rank after the restart (10 steps an epoch here:
    step 6 is mid-epoch), so the weights come out bit for bit the same."""
    root, common = prepared
    train = [*TRAIN, *common, "stage.optimizer.schedule=constant", "stage.checkpoint_every=3", "stage.eval_every=6"]
    straight = stages.load("train_autoencoder").run(
        compose(
            *train,
            "stage.steps=12",
            f"stage.output_url={root}/store/ae-straight",
            f"stage.checkpoints_url={root}/store/ckpt-straight",
        )
    )
    resumed_args = [
        *train,
        f"stage.output_url={root}/store/ae-resumed",
        f"stage.checkpoints_url={root}/store/ckpt-resumed",
    ]
    stages.load("train_autoencoder").run(compose(*resumed_args, "stage.steps=6"))
    resumed = stages.load("train_autoencoder").run(compose(*resumed_args, "stage.steps=12", "overwrite=true"))
    assert straight["counts"]["steps"] == resumed["counts"]["steps"] == 12
    a, b = (load_first_stage(f"{root}/store/{name}/model").state_dict() for name in ("ae-straight", "ae-resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gpu_workers_on_a_cluster_without_gpus_are_refused_at_once(prepared):
    """Ray Train would wait forever for bundles that never fit (the local cluster declares no GPUs)."""
    root, common = prepared
    with pytest.raises(
        ValueError,
        match=r"^stage.scaling.num_workers: 2 x 1 GPU at once: 2 GPU, the local cluster has 0 \(cluster.num_gpus\)$",
    ):
        stages.load("train_autoencoder").run(
            compose(*TRAIN, *common, "stage.scaling.use_gpu=true", f"stage.output_url={root}/store/ae-gpu")
        )


def test_the_vq_first_stage_trains_end_to_end_with_the_perceptual_term(prepared):
    root, common = prepared
    lpips = ",".join(f"'{path}'" for path in write_lpips_weights(root / "lpips"))
    vq = [
        *TRAIN,
        *common,
        "stage.model.preset=tiny-vq-f4",
        "stage.steps=8",
        "stage.scaling.num_workers=1",
        f"stage.output_url={root}/store/vq",
    ]
    for crop in (96, 30):
        with pytest.raises(
            ValueError,
            match=rf"stage.crop={crop}: expected null or a side in \(0, data.resolution=64\], "
            "a multiple of the first stage's factor 4",
        ):
            stages.load("train_autoencoder").run(compose(*vq, f"stage.crop={crop}"))
    # On 32 px patches of the 64 px images; validated on whole images.
    manifest = stages.load("train_autoencoder").run(
        compose(*vq, "stage.loss.disc_start=4", f"stage.lpips_weights=[{lpips}]", "stage.crop=32")
    )
    assert manifest["facts"]["kind"] == "vq"
    metrics = manifest["facts"]["final_metrics"]
    assert 0 < metrics["val/codebook_usage"] <= 1 and metrics["train/d_weight"] >= 0 and "train/disc_loss" in metrics
    assert metrics["train/p_loss"] > 0 and metrics["val/psnr"] > 0
    assert load_first_stage(f"{root}/store/vq/model").config.num_vq_embeddings == 256


def test_training_patches_are_windows_of_the_image_drawn_from_the_seed_and_the_key():
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    batch = {"key": np.array(["a", "b"]), "image": np.array([encode_png(image)] * 2, dtype=object)}
    patches = remote.pixels(batch, resolution=64, seed=(0, 1), flip=False, side=32)["pixels"]
    assert patches.shape == (2, 3, 32, 32)
    assert np.array_equal(patches, remote.pixels(batch, resolution=64, seed=(0, 1), flip=False, side=32)["pixels"])
    whole = normalise(image)
    offsets = [
        [
            (top, left)
            for top in range(33)
            for left in range(33)
            if np.array_equal(whole[:, top : top + 32, left : left + 32], p)
        ]
        for p in patches
    ]
    assert all(len(found) == 1 for found in offsets) and offsets[0] != offsets[1]  # each key its own window
    assert remote.pixels(batch, resolution=64, seed=None, flip=False)["pixels"].shape == (
        2,
        3,
        64,
        64,
    )  # validation: whole
