"""From nothing to measured prompt adherence on this machine, in one run: the recipe for a tiny model that
follows its prompts, ``experiment=quality`` (conf/experiment/quality.yaml).

``stage=pipeline`` with that experiment (synthesize -> prepare -> train_autoencoder -> encode_latents -> train_ldm (tiny)
-> sample -> evaluate -> export, as a user runs it: Ray, MLflow, local storage) prints each stage's minutes, the
total against the 45-minute budget, and the held-out prompt adherence: per attribute, the fraction of images
generated for (colour, shape, background) combinations never rendered in training whose classified attribute
is the prompted one, beside chance (target: object colour >= 0.8, chance 1/8).

    .venv/bin/python benchmarks/quality.py [--root DIR] [more stage=pipeline overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipelines import stages  # noqa: E402
from pipelines.config import compose as config  # noqa: E402

TARGET_COLOUR, BUDGET_MINUTES = 0.8, 45
# How it is measured: DDIM 25 steps (50 gave nothing more in a trial on 2 cores), every held-out prompt (up to 256).
MEASURE = [
    "stage.train_autoencoder.eval_every=500", "stage.train_autoencoder.checkpoint_every=500",
    "stage.train_ldm.checkpoint_every=500", "stage.train_ldm.sample_every=850",
    "stage.evaluate.steps=25", "stage.evaluate.adherence.prompts=256",
    "stage.evaluate.batch_size=64",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="where the run's storage and MLflow go (default: a new temp dir)")
    parser.add_argument("overrides", nargs="*", help="more stage=pipeline overrides, e.g. stage.train_ldm.steps=2400")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-quality-"))
    common = [f"storage.root={root}/store", f"tracking.uri=sqlite:///{root}/mlruns.db", "tracking.experiment=quality"]
    started = time.perf_counter()
    results = stages.load("pipeline").run(config("experiment=quality", *common, *MEASURE, *args.overrides))
    total = (time.perf_counter() - started) / 60

    report = json.loads((root / "store" / "evaluation" / "metrics.json").read_text())
    adherence = report["metrics"]["adherence"]
    print(f"\ncores: {os.cpu_count()} | experiment=quality {' '.join(args.overrides)}")
    print(" | ".join(f"{name} {r['minutes']:.1f} min" for name, r in results.items()) + f" | total {total:.1f} min (budget {BUDGET_MINUTES})")
    print(f"held-out prompt adherence over {adherence['prompts']} prompts (raw weights, DDIM 25, guidance {report['guidance_scale']}):")
    for attribute in ("colour", "shape", "position", "background"):
        print(f"  {attribute:<10} {adherence[f'{attribute}_accuracy']:.3f}  (chance {adherence[f'{attribute}_chance']:.3f})")
    print(f"  all four   {adherence['all_accuracy']:.3f}")
    print(f"object colour {adherence['colour_accuracy']:.3f} / target {TARGET_COLOUR} = {adherence['colour_accuracy'] / TARGET_COLOUR:.2f}; "
          f"minutes {total:.1f} / budget {BUDGET_MINUTES} = {total / BUDGET_MINUTES:.2f}")
    if "reconstruction" in report["metrics"]:
        r = report["metrics"]["reconstruction"]
        print(f"first stage, held out: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}")
    print(f"adherence grid: {root}/store/evaluation/adherence.png | samples: {root}/store/samples/grid.png | "
          f"MLflow: sqlite:///{root}/mlruns.db")


if __name__ == "__main__":
    main()
