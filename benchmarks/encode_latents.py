"""stage=encode_latents images/s against a bare in-process loop over the same images, measured in one run.

The bare loop is what any script must do at the least: read the prepared parquet with pyarrow, decode and
center-crop each image, and run the encoder on batches of ``stage.resources.encoder_batch_size`` with
``num_cpus_per_encoder`` torch threads. The stage does that on Ray Data (decode tasks, an encoder actor pool,
writer tasks), plus writing the latent shards, per-file done markers, statistics and a manifest. Ray itself is
started before the clock starts; the actor's start-up and model load are inside it, a fixed cost (a fresh
process imports torch and diffusers) that the script also measures on its own, so that the ratio can be read
for any dataset size.

    .venv/bin/python benchmarks/encode_latents.py [--images 16000] [--preset tiny-kl-f4] [overrides ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm.data.images import square_crop  # noqa: E402
from ldm.models.first_stage import build_first_stage, encode_pixels, load_first_stage  # noqa: E402
from ldm.models.presets import first_stage_preset  # noqa: E402
from ldm.storage import Storage  # noqa: E402
from pipelines import stages  # noqa: E402
from pipelines.driver.cluster import connect  # noqa: E402
from pipelines.driver.config import compose as config  # noqa: E402
from pipelines.stages.encode_latents.encoder import Encoder, encoder_device  # noqa: E402


def bare_loop(shards: list[Path], model_dir: Path, cfg) -> tuple[int, float]:
    resources = cfg.stage.resources
    torch.set_num_threads(int(max(1, resources.num_cpus_per_encoder)))
    started = time.perf_counter()
    model = load_first_stage(str(model_dir)).eval()
    images = 0
    for shard in shards:
        table = pq.read_table(shard, columns=["key", "image"])
        data = table["image"].to_pylist()
        for start in range(0, len(data), resources.encoder_batch_size):
            crops = np.stack(
                [square_crop(d, cfg.stage.resolution) for d in data[start : start + resources.encoder_batch_size]]
            )
            encode_pixels(model, crops)
            images += len(crops)
    return images, time.perf_counter() - started


def encoder_start_up(model_dir: Path, cfg) -> float:
    """Seconds from asking Ray for an encoder actor (the stage's resources) to its model being loaded."""
    resources = cfg.stage.resources
    actor = ray.remote(Encoder).options(
        num_cpus=resources.num_cpus_per_encoder, num_gpus=resources.num_gpus_per_encoder
    )
    started = time.perf_counter()
    encoder = actor.remote(
        str(model_dir),
        None,
        Storage.from_config(cfg.storage),
        encoder_device(resources.num_gpus_per_encoder),
        str(resources.dtype),
        int(max(1, resources.num_cpus_per_encoder)),
        cfg.stage.resolution,
        release_every=resources.release_memory_every,
        text_encoder=None,
        text_encoder_subfolder=None,
    )
    ray.get(encoder.__ray_ready__.remote())
    seconds = time.perf_counter() - started
    ray.kill(encoder)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16000)
    parser.add_argument("--preset", default="tiny-kl-f4")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for stage=encode_latents")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    common = [
        f"storage.root={work}/store",
        f"tracking.uri=sqlite:///{work}/mlruns.db",
        "tracking.experiment=bench",
        f"data.num_samples={args.images}",
        f"data.resolution={args.resolution}",
    ]
    stages.load("synthesize").run(config("stage=synthesize", *common))
    stages.load("prepare").run(config("stage=prepare", *common))
    model_dir = work / "first_stage"
    build_first_stage(first_stage_preset(args.preset)).save_pretrained(
        model_dir
    )  # random weights: the compute is the same

    cfg = config("stage=encode_latents", *common, f"stage.first_stage={model_dir}", *args.overrides)
    connect(cfg.cluster)
    shards = sorted((work / "store" / "prepared" / "shards").glob("*.parquet"))
    bare_images, bare_s = bare_loop(shards, model_dir, cfg)
    start_up_s = encoder_start_up(model_dir, cfg)

    shutil.rmtree(work / "store" / "latents", ignore_errors=True)
    started = time.perf_counter()
    manifest = stages.load("encode_latents").run(cfg)
    stage_s = time.perf_counter() - started
    images = manifest["counts"]["rows_in"]
    assert images == bare_images, (images, bare_images)
    r = cfg.stage.resources
    print(
        f"\ncores: {os.cpu_count()} | {args.preset} at {args.resolution}px, {images} images | encoder: "
        f"{r.encoder_concurrency} actor x {r.num_cpus_per_encoder} CPU, batch {r.encoder_batch_size}; decode tasks "
        f"{r.num_cpus_per_decode_task} CPU each"
    )
    print(
        f"bare loop: {images / bare_s:.1f} images/s ({bare_s:.1f}s) | stage: {images / stage_s:.1f} images/s "
        f"({stage_s:.1f}s end to end) | ratio stage/bare {bare_s / stage_s:.2f}"
    )
    print(
        f"of the stage's time: {start_up_s:.1f}s is the encoder actor's start-up (process, imports, model) | "
        f"without it: {images / (stage_s - start_up_s):.1f} images/s, ratio {bare_s / (stage_s - start_up_s):.2f}"
    )
    print(f"work dir: {work}")


if __name__ == "__main__":
    main()
