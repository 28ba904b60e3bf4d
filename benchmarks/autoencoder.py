"""tiny-kl-f4 on 64x64 synthesized images: held-out reconstruction after a stated CPU budget, in one run.

Synthesizes and prepares ``--images`` images, then runs stage=train_autoencoder exactly as a user would
(Ray Train, ``stage.scaling.num_workers`` CPU workers, the stage's default recipe) for ``--steps`` steps, and
prints:
- held-out PSNR and SSIM (rows the stage never trained on) and the ratio of the PSNR to the 30 dB target;
- how often the synthesizer's classifier reads the same colour, shape, quadrant and background from a
  held-out reconstruction as from its original (PSNR alone can hide a small object's lost colour);
- the stage's training throughput against a bare single-process loop of the same model, loss and global
  batch on preloaded tensors (ratio: what Ray Train, DDP and the Ray Data feed cost or gain).

    .venv/bin/python benchmarks/autoencoder.py [--steps N] [--images 4000] [stage overrides]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm.data.images import to_pixels  # noqa: E402
from ldm.losses.first_stage import FirstStageLoss, LossWeights  # noqa: E402
from ldm.models.first_stage import Reconstruct, build_first_stage, kind, last_layer  # noqa: E402
from ldm.models.presets import first_stage_preset  # noqa: E402
from pipelines import stages  # noqa: E402
from pipelines.driver.config import compose as config  # noqa: E402

TARGET_PSNR = 30.0


def bare_images_per_s(cfg, images: np.ndarray, steps: int = 20) -> float:
    """The same model, loss and global batch in one process with every core, on tensors already in memory."""
    settings = cfg.stage
    torch.set_num_threads(os.cpu_count())
    model = build_first_stage(first_stage_preset(settings.model.preset), settings.model.logvar_bias)
    loss = FirstStageLoss(kind(model), LossWeights(**settings.loss))
    extra = [loss.logvar] if loss.logvar is not None else []
    optimizer = torch.optim.Adam(
        [*model.parameters(), *extra], lr=settings.optimizer.lr, betas=tuple(settings.optimizer.betas)
    )
    batch = settings.batch_size * settings.scaling.num_workers
    network = Reconstruct(model)
    rng = np.random.default_rng(0)
    for step in range(steps + 3):  # 3 warm-up steps
        if step == 3:
            started = time.perf_counter()
        x = torch.from_numpy(images[rng.integers(len(images), size=batch)])
        reconstructions, encoded = network(x)
        value, _ = loss.generator(x, reconstructions, encoded, step, last_layer(model))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="default: the stage's stage.steps")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for stage=train_autoencoder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-autoencoder-"))
    tracking = f"sqlite:///{work}/mlruns.db"
    common = [
        f"storage.root={work}/store",
        f"tracking.uri={tracking}",
        "tracking.experiment=bench",
        f"data.num_samples={args.images}",
    ]
    stages.load("synthesize").run(config("stage=synthesize", *common))
    stages.load("prepare").run(config("stage=prepare", *common))

    steps = [f"stage.steps={args.steps}"] if args.steps else []
    cfg = config("stage=train_autoencoder", *common, *steps, *args.overrides)
    shards = sorted((work / "store" / "prepared" / "shards").glob("*.parquet"))
    table = pq.read_table(shards, columns=["image"])  # the training rows: prepare keeps the held-out ones apart
    training = np.stack([to_pixels(b, cfg.data.resolution) for b in table["image"].to_pylist()])
    bare = bare_images_per_s(cfg, training)

    started = time.perf_counter()
    manifest = stages.load("train_autoencoder").run(cfg)
    minutes = (time.perf_counter() - started) / 60
    metrics = manifest["facts"]["final_metrics"]
    client = mlflow.MlflowClient(tracking_uri=tracking)
    [run] = client.search_runs(
        [client.get_experiment_by_name("bench").experiment_id],
        "tags.stage = 'train_autoencoder'",
        order_by=["start_time DESC"],
        max_results=1,
    )
    stage_rate = statistics.median(m.value for m in client.get_metric_history(run.info.run_id, "train/samples_per_s"))

    s = cfg.stage
    print(
        f"\ncores: {os.cpu_count()} | {s.model.preset}, {s.scaling.num_workers} workers x batch {s.batch_size}, "
        f"{s.steps} steps in {minutes:.1f} min (stage wall time, Ray start-up included)"
    )
    print(
        f"held-out ({int(metrics['val/images'])} images): PSNR {metrics['val/psnr']:.2f} dB, SSIM "
        f"{metrics['val/ssim']:.3f} | ratio PSNR / {TARGET_PSNR:.0f} dB target: {metrics['val/psnr'] / TARGET_PSNR:.3f}"
    )
    print(
        "the scene classifier reads the original's attribute in the reconstruction: "
        + ", ".join(f"{k.removeprefix('val/scene_')} {v:.1%}" for k, v in metrics.items() if k.startswith("val/scene_"))
    )
    print(
        f"training throughput: stage {stage_rate:.1f} images/s (median of logged windows), bare loop {bare:.1f} "
        f"images/s | ratio stage/bare {stage_rate / bare:.2f}"
    )
    print(f"work dir: {work}")


if __name__ == "__main__":
    main()
