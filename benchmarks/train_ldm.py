"""train_ldm from precomputed latents against encoding pixels every step, and the stage's data wait, in one run.

1. Synthesizes and prepares ``--images`` images and encodes them with a tiny-kl-f4 first stage (random weights
   unless ``--first-stage`` names a trained one: speed does not depend on the weights).
2. Two bare loops in this process, same model, batch, threads and precision, on the same images:
   (a) z0 drawn from the stored posterior moments, as stage=train_ldm does;
   (b) pixels through the first stage's encoder every step, as CompVis LDM and diffusers'
       ``train_text_to_image.py`` do; prints steps/s of both and the ratio (a)/(b).
3. stage=train_ldm itself (Ray Train, ``stage.scaling.num_workers`` workers, Ray Data feeding the latents) for
   ``--steps`` steps: its steps/s and the fraction of step time spent waiting for data (target < 5 %), as
   the stage logged them to MLflow: steps/s the median of the logged windows after the first (start-up), data
   wait their time-weighted mean, epoch boundaries included (``--images`` sets how many there are).

    .venv/bin/python benchmarks/train_ldm.py [--steps 200] [--images 4000] [overrides for stage=train_ldm]
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

from ldm.data.images import normalise, square_crop  # noqa: E402
from ldm.devices import autocast as autocast_for  # noqa: E402
from ldm.devices import autocast_dtype
from ldm.diffusion.objective import DenoisingLoss, DiffusionObjective, sample_latents  # noqa: E402
from ldm.latents import column_array  # noqa: E402
from ldm.models.first_stage import build_first_stage, encode, load_first_stage  # noqa: E402
from ldm.models.presets import first_stage_preset, text_to_image_preset  # noqa: E402
from ldm.models.text_to_image import build_text_encoder, build_unet, set_attention  # noqa: E402
from pipelines import stages  # noqa: E402
from pipelines.driver.config import compose as config  # noqa: E402
from pipelines.stages.train_ldm.loop import training_schedule  # noqa: E402

TARGET_WAIT = 0.05


def bare_steps_per_s(
    cfg, latents: dict[str, np.ndarray], pixels: np.ndarray | None, first_stage, vocab: int, steps: int
) -> float:
    """Optimizer steps/s of the train_ldm step on in-memory data; with ``pixels``, z0 comes from encoding them."""
    settings = cfg.stage
    torch.manual_seed(0)
    spec = text_to_image_preset(settings.model.preset, settings.model.unet, settings.model.text_encoder)
    text_encoder = build_text_encoder(spec.text_encoder, vocab, latents["input_ids"].shape[1])
    channels, size = latents["latent_mean"].shape[1], latents["latent_mean"].shape[2]
    unet = build_unet(spec.unet, channels, size, spec.text_encoder.width)
    set_attention(unet, settings.attention, torch.device("cpu"))
    objective = DiffusionObjective(training_schedule(settings.noise), settings.noise.snr_gamma)
    module = DenoisingLoss(unet, text_encoder, objective, train_text_encoder=True)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=settings.optimizer.lr)
    batch = settings.batch_size * settings.scaling.num_workers
    cpu = torch.device("cpu")
    autocast = autocast_for(cpu, autocast_dtype(cpu, str(settings.precision), "stage.precision"))
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps + 3):  # 3 warm-up steps
        if step == 3:
            started = time.perf_counter()
        rows = rng.integers(len(latents["input_ids"]), size=batch)
        with autocast:
            if pixels is None:
                moments = {k: torch.from_numpy(latents[k][rows]) for k in ("latent_mean", "latent_logvar")}
                z0 = sample_latents(moments, 1.0, generator)
            else:
                with torch.no_grad():
                    z0 = encode(first_stage, torch.from_numpy(normalise(pixels[rows]))).sample(generator)
            loss = module(z0, torch.from_numpy(latents["input_ids"][rows]).long(), generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="stage=train_ldm steps")
    parser.add_argument("--bare-steps", type=int, default=40)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--first-stage", default=None, help="a trained first stage (diffusers directory)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for stage=train_ldm")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    work = Path(tempfile.mkdtemp(prefix="bench-train-ldm-"))
    tracking = f"sqlite:///{work}/mlruns.db"
    common = [
        f"storage.root={work}/store",
        f"tracking.uri={tracking}",
        "tracking.experiment=bench",
        f"data.num_samples={args.images}",
    ]
    first_stage_dir = args.first_stage or str(work / "first_stage")
    if args.first_stage is None:
        build_first_stage(first_stage_preset("tiny-kl-f4"), logvar_bias=-6.0).save_pretrained(first_stage_dir)
    stages.load("synthesize").run(config("stage=synthesize", *common))
    stages.load("prepare").run(config("stage=prepare", *common))
    stages.load("encode_latents").run(config("stage=encode_latents", *common, f"stage.first_stage={first_stage_dir}"))

    cfg = config(
        "stage=train_ldm",
        *common,
        f"stage.steps={args.steps}",
        "stage.log_every=20",
        f"stage.sample_every={args.steps}",
        *args.overrides,
    )
    latent_table = pq.read_table(
        work / "store" / "latents" / "shards", columns=["key", "input_ids", "latent_mean", "latent_logvar"]
    )
    latents = {
        "input_ids": np.stack(latent_table["input_ids"].to_numpy(zero_copy_only=False)),
        "latent_mean": column_array(latent_table["latent_mean"]),
        "latent_logvar": column_array(latent_table["latent_logvar"]),
    }
    images = pq.read_table(work / "store" / "prepared" / "shards", columns=["key", "image"])
    by_key = dict(zip(images["key"].to_pylist(), images["image"].to_pylist()))
    pixels = np.stack([square_crop(by_key[k], cfg.data.resolution) for k in latent_table["key"].to_pylist()])
    first_stage = load_first_stage(first_stage_dir).eval()
    vocab = int(latents["input_ids"].max()) + 1
    precomputed = bare_steps_per_s(cfg, latents, None, first_stage, vocab, args.bare_steps)
    on_the_fly = bare_steps_per_s(cfg, latents, pixels, first_stage, vocab, args.bare_steps)

    started = time.perf_counter()
    stages.load("train_ldm").run(cfg)
    minutes = (time.perf_counter() - started) / 60
    client = mlflow.MlflowClient(tracking_uri=tracking)
    [run] = client.search_runs(
        [client.get_experiment_by_name("bench").experiment_id],
        "tags.stage = 'train_ldm'",
        order_by=["start_time DESC"],
        max_results=1,
    )
    epochs = int(max(m.value for m in client.get_metric_history(run.info.run_id, "train/epoch")))

    def logged(key):
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)][1:]

    rates, waits = logged("train/steps_per_s"), logged("train/data_wait_fraction")
    stage_rate = statistics.median(rates)
    seconds = [cfg.stage.log_every / rate for rate in rates]  # each logged window is log_every steps
    wait = sum(w * s for w, s in zip(waits, seconds)) / sum(seconds)  # epoch boundaries included

    s = cfg.stage
    print(
        f"\ncores: {os.cpu_count()} | preset {s.model.preset}, global batch {s.batch_size * s.scaling.num_workers}, "
        f"latents {list(latents['latent_mean'].shape[1:])} from {cfg.data.resolution}px, precision {s.precision}"
    )
    print(
        f"bare loop, {torch.get_num_threads()} threads: (a) precomputed latents {precomputed:.2f} steps/s, "
        f"(b) encoding pixels every step {on_the_fly:.2f} steps/s | ratio (a)/(b) {precomputed / on_the_fly:.2f}"
    )
    print(
        f"stage=train_ldm, {s.scaling.num_workers} Ray Train workers: {stage_rate:.2f} steps/s "
        f"(median of logged windows; {args.steps} steps in {minutes:.1f} min with start-up) | "
        f"data wait {wait:.1%} of step time (target < {TARGET_WAIT:.0%}; over the windows after the first, "
        f"{epochs} epoch boundaries among them, worst window {max(waits):.1%}) | "
        f"stage/bare(a) {stage_rate / precomputed:.2f}"
    )
    print(f"work dir: {work}")


if __name__ == "__main__":
    main()
