"""Each of the paper's other tasks from nothing on this machine, measured against its baseline, in one run.

For each task, ``stage=pipeline task=<name>`` on the embedded default (the synthetic corpus, the demo's step
counts or those BUDGET gives the task) as a user runs it. The tasks share one storage root, so synthesize,
prepare and the first stage are made once (super-resolution trains its own 3-channel first stage); a task's minutes from
nothing are its own stages' plus those of the shared stages it used, as each took when it ran. Then its metric against
its baseline, as a ratio that says whether it is beaten (> 1 is better than the baseline; for tv, target / tv,
>= 1 meets it):

- unconditional: total variation of the generated scenes' attributes from the data's (target <= 0.15) and
  the fraction of images holding one clean object (target >= 0.8);
- class_conditional: class accuracy against chance (1 / classes);
- layout_to_image: box IoU and position accuracy against the same measures between layouts;
- super_resolution: PSNR and SSIM against bicubic upsampling of the same low-resolution images;
- inpainting: PSNR in the hole against filling it with the surrounding mean.

The limit: 20 minutes from nothing per task on 2 cores.

    .venv/bin/python benchmarks/tasks.py [--root DIR] [--tasks unconditional,class_conditional,...] [more overrides]
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
from pipelines.driver.config import compose  # noqa: E402

TASKS = ("unconditional", "class_conditional", "layout_to_image", "super_resolution", "inpainting")
LIMIT_MINUTES = 20
SHARED = ("synthesize", "prepare", "train_autoencoder", "encode_latents")
# (metric group, value, baseline or target, whether higher is better): the ratio is value / baseline when higher
# is better, target / value when lower is.
CHECKS = {
    "unconditional": [("scenes", "tv", 0.15, False), ("scenes", "clean_fraction", 0.8, True)],
    "class_conditional": [("classes", "accuracy", "chance", True)],
    "layout_to_image": [
        ("layouts", "iou", "chance_iou", True),
        ("layouts", "position_accuracy", "chance_position", True),
    ],
    "super_resolution": [
        ("super_resolution", "psnr", "bicubic_psnr", True),
        ("super_resolution", "ssim", "bicubic_ssim", True),
    ],
    "inpainting": [("inpainting", "psnr_hole", "mean_fill_psnr_hole", True)],
}
MEASURE = ["stage.evaluate.batch_size=64", "stage.evaluate.fid.feature_extractor=null"]
# Each task's steps within its 20 minutes (the demo's: 400 first-stage, 450 train_ldm). The models that must
# learn where to put the object from its layout spend the minutes the demo leaves on train_ldm; so do the UNets
# without cross-attention (unconditional, inpainting), whose steps are 2x as fast (no self-attention on the full
# latent grid): unconditional, 2,000 steps decaying its rate to 0 by the last, and inpainting 900. Super-
# resolution's samples are no sharper than its own 3-channel first stage reconstructs (they came within 0.3 dB
# of it after 450 steps), so most of its minutes go to that first stage, trained on 32 px patches (3.8x the
# images/s of whole 64 px images; 23.2 dB after 1,200 such steps against 22.8 after 400 whole-image ones, in
# the same 3.7 minutes), the rest to 800 train_ldm steps (400: SSIM 0.836 against bicubic's 0.844; 800: 0.851).
BUDGET = {
    "unconditional": ["stage.train_ldm.steps=2000", "stage.train_ldm.optimizer.schedule=cosine"],
    "layout_to_image": ["stage.train_ldm.steps=900"],
    "super_resolution": [
        "stage.train_autoencoder.steps=6000",
        "stage.train_autoencoder.crop=32",
        "stage.train_ldm.steps=800",
    ],
    "inpainting": ["stage.train_ldm.steps=900"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="where the runs' storage and MLflow go (default: a new temp dir)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("overrides", nargs="*", help="more stage=pipeline overrides, e.g. stage.train_ldm.steps=600")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-tasks-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)  # MLflow puts an sqlite store's artifacts under the working directory: keep them with the run
    common = [
        f"storage.root={root}/store",
        f"tracking.uri=sqlite:///{root}/mlruns.db",
        "tracking.experiment=tasks",
        *MEASURE,
    ]
    spent: dict[tuple[str, str], float] = {}  # (stage, its output) -> minutes, when it ran
    rows = []
    for name in args.tasks.split(","):
        cfg = compose("stage=pipeline", f"task={name}", *common, *BUDGET.get(name, []), *args.overrides)
        started = time.perf_counter()
        results = stages.load("pipeline").run(cfg)
        wall = (time.perf_counter() - started) / 60
        minutes = 0.0
        for stage, result in results.items():
            output = str(cfg.stage[stage].get("output_url", stage)) if stage in cfg.stage else stage
            if not result["skipped"]:
                spent[(stage, output)] = result["minutes"]
            minutes += spent.get((stage, output), 0.0) if result["skipped"] else result["minutes"]
        metrics = json.loads((root / "store" / f"evaluation_{name}" / "metrics.json").read_text())["metrics"]
        for group, value, baseline, higher in CHECKS[name]:
            scores = metrics[group]
            reference = scores[baseline] if isinstance(baseline, str) else baseline
            ratio = scores[value] / reference if higher else reference / max(scores[value], 1e-9)
            rows.append(
                (
                    name,
                    f"{group}/{value}",
                    scores[value],
                    f"{baseline} {reference:.3f}" if isinstance(baseline, str) else f"target {reference}",
                    ratio,
                    minutes,
                    " ".join(s.split(".", 1)[1] for s in BUDGET.get(name, [])) or "the demo's",
                )
            )
        print(
            f"\n{name}: {wall:.1f} min this run, {minutes:.1f} min from nothing; "
            f"{json.dumps(metrics.get(CHECKS[name][0][0]))}",
            flush=True,
        )

    print(f"\ncores: {os.cpu_count()} | the embedded default per task {' '.join(args.overrides)}")
    print(
        "| task | metric | value | baseline | ratio (> 1: beats it; tv: >= 1 meets it) | "
        f"minutes from nothing (limit {LIMIT_MINUTES}) | steps |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, metric, value, baseline, ratio, minutes, steps in rows:
        print(f"| {name} | {metric} | {value:.3f} | {baseline} | {ratio:.2f} | {minutes:.1f} | {steps} |")
    print(f"MLflow: sqlite:///{root}/mlruns.db | grids: {root}/store/evaluation_<task>/adherence.png")


if __name__ == "__main__":
    main()
