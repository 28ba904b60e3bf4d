"""Every GPU code path of the pipeline in one run, one line per check: on a machine with one GPU (under 8 minutes),
or with ``--cpu`` the same checks at small sizes on the CPU, which exercises all but the CUDA calls.

    .venv/bin/python benchmarks/gpu.py          # one GPU: the paper's kl-f8 first stage and txt2img-1p4b UNet at 256 px
    .venv/bin/python benchmarks/gpu.py --cpu    # CPU: tiny presets at 64 px (what CI can run)

The checks, in order, each a stage run in-process as ``python pipelines/run.py`` runs it:
1. ``train_autoencoder``: on the GPU worker (``stage.scaling.use_gpu``, bf16 where the GPU has it), then the same
   command with twice the steps, which resumes from the checkpoint: the optimizer's state must be on the GPU.
2. ``encode_latents``: an encoder actor on the GPU (``num_gpus_per_encoder=1``) in bf16, with a frozen text encoder
   saved in fp16 (it loads in fp32, then runs in the actor's dtype); images/s per device and the encoder's MFU.
3. ``train_ldm``: bf16 on the GPU worker, then resumed to twice the steps (CUDA random states, the optimizer on the
   GPU); steps/s, images/s per device and MFU.
4. ``sample`` and ``evaluate`` on ``device=cuda``; 5. ``export``, then the registered MLflow model served on the GPU.

Each line: ``gpu: <check>: ok|FAILED <what was measured or what broke> (<seconds> s)``; the last line counts them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

from ldm.flops import peak_flops, step_flops  # noqa: E402
from ldm.models.first_stage import encode_pixels, for_inference, load_first_stage  # noqa: E402
from ldm.text.tokenizer import load_tokenizer  # noqa: E402
from pipelines import stages  # noqa: E402
from pipelines.driver.config import compose  # noqa: E402

# Per mode: the hardware settings and the sizes. The GPU sizes show throughput (the paper's models at 256 px),
# the CPU ones only take every path.
MODES = {
    "gpu": {
        "hardware": ["cluster.num_gpus=1", "cluster.num_cpus=8"],
        # One checkpoint kept: the 1.45B UNet's, with its EMA and AdamW's moments, is about 19 GB.
        "train": [
            "stage.scaling.use_gpu=true",
            "stage.scaling.num_workers=1",
            "stage.scaling.cpus_per_worker=2",
            "stage.keep_checkpoints=1",
        ],
        "data": ["data.num_samples=2048", "data.resolution=256"],
        "autoencoder": [
            "stage.model.preset=kl-f8",
            "stage.batch_size=8",
            "stage.steps=20",
            "stage.checkpoint_every=20",
        ],
        "encode": [
            "stage.resources.num_gpus_per_encoder=1",
            "stage.resources.num_cpus_per_encoder=1",
            "stage.resources.encoder_batch_size=64",
            "stage.resources.dtype=bfloat16",
        ],
        "ldm": [
            "stage.model.preset=txt2img-1p4b",
            "stage.batch_size=16",
            "stage.steps=30",
            "stage.checkpoint_every=30",
            "stage.log_every=10",
            "stage.validation.prompts=[]",
            "stage.precision=bf16",
        ],
        "device": "cuda",
    },
    "cpu": {
        "hardware": [],
        "train": ["stage.scaling.num_workers=1"],
        "data": [],
        "autoencoder": ["stage.steps=4", "stage.checkpoint_every=4"],
        "encode": [],
        "ldm": [
            "stage.steps=4",
            "stage.checkpoint_every=4",
            "stage.log_every=2",
            "stage.validation.prompts=[]",
            "stage.precision=bf16",
        ],
        "device": "cpu",
    },
}


class Checks:
    def __init__(self):
        self.passed = self.failed = 0

    def run(self, name: str, check) -> object:
        started = time.time()
        try:
            result, detail = check()
        except Exception as error:  # a check that breaks is reported, and the ones after it that can still run go on
            self.failed += 1
            traceback.print_exc()
            print(
                f"gpu: {name}: FAILED {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
                f"({time.time() - started:.0f} s)"
            )
            return None
        self.passed += 1
        print(f"gpu: {name}: ok {detail} ({time.time() - started:.0f} s)")
        return result


def frozen_text_encoder(root: Path, tokenizer_dir: str, max_length: int) -> str:
    """A small BERT with the prepared tokenizer's vocabulary, saved in fp16 as many releases are."""
    vocab = len(load_tokenizer(tokenizer_dir))
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=vocab,
            hidden_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=1024,
            max_position_embeddings=max_length,
        )
    )
    path = root / "frozen-text-encoder"
    model.half().save_pretrained(path)
    return str(path)


def encoding_flops(facts: dict, device: torch.device) -> float:
    """One image's encoding FLOPs (torch's counter, as the training stages count theirs) over the device's peak in
    the actor's precision: times images/s, the encoder's MFU (NaN where the peak is unknown)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    first = facts["first_stage"]
    model = for_inference(load_first_stage(first["location"], None, first["subfolder"]), device, dtype)
    pixels = np.zeros((1, facts["resolution"], facts["resolution"], 3), np.uint8)
    flops = step_flops(lambda: encode_pixels(model, pixels, device, dtype), [model])
    return flops / (peak_flops(device, dtype) or float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="every check on the CPU at small sizes")
    parser.add_argument("--root", help="where outputs go (default: a temporary folder)")
    args = parser.parse_args()
    mode = MODES["cpu" if args.cpu else "gpu"]
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu: no CUDA GPU here: run with --cpu to take every path on the CPU")
    root = Path(args.root or tempfile.mkdtemp(prefix="gpu-bench-"))
    common = [
        "experiment=ci",
        f"storage.root={root}/store",
        f"tracking.uri=sqlite:///{root}/mlruns.db",
        *mode["hardware"],
        *mode["data"],
    ]
    device = torch.cuda.get_device_name() if not args.cpu else "CPU"
    print(f"gpu: on {device}, torch {torch.__version__} (CUDA {torch.version.cuda}), outputs under {root}")
    checks = Checks()

    def stage(name: str, *overrides: str) -> dict:
        return stages.load(name).run(compose(f"stage={name}", *common, *overrides))

    def data():
        stage("synthesize")
        prepared = stage("prepare")
        return prepared, f"{prepared['counts']['rows_out']} rows prepared"

    prepared = checks.run("data (synthesize, prepare)", data)
    if prepared is None:
        raise SystemExit(1)

    def trained_and_resumed(name: str, *settings: str) -> tuple[int, dict]:
        """``name`` trained for its steps, then the same command with twice the steps, which resumes from the
        first run's last checkpoint (the training's identity leaves the step count out)."""
        steps = int(next(s for s in settings if s.startswith("stage.steps=")).split("=")[1])
        stage(name, *settings)
        return steps, stage(name, *settings, f"stage.steps={2 * steps}", "overwrite=true")

    def autoencoder():
        steps, resumed = trained_and_resumed("train_autoencoder", *mode["train"], *mode["autoencoder"])
        metrics = resumed["facts"]["final_metrics"]
        return resumed, (
            f"{steps} steps, resumed to {resumed['counts']['steps']}; "
            f"{metrics.get('train/samples_per_s', 0):.1f} images/s, "
            f"MFU {metrics.get('perf/mfu', float('nan')):.3f}, "
            f"held-out PSNR {metrics.get('val/psnr', float('nan')):.1f} dB"
        )

    checks.run("train_autoencoder with a resume", autoencoder)
    tokenizer = f"{root}/store/prepared/{prepared['facts']['tokenizer']['path'].strip('/')}"
    text_encoder = frozen_text_encoder(root, tokenizer, prepared["facts"]["tokenizer"]["max_length"])

    def encode():
        encoded = stage("encode_latents", *mode["encode"], f"stage.text_encoder={text_encoder}")
        rate = encoded["timings"]["images_per_s"]
        mfu = rate * encoding_flops(encoded["facts"], torch.device(mode["device"]))
        return encoded, (
            f"{encoded['counts']['rows_out']} images with τθ(y) from an fp16-saved encoder; "
            f"{rate:.1f} images/s per device, MFU {mfu:.3f}"
        )

    checks.run("encode_latents on GPU actors, frozen text encoder", encode)

    def train():
        steps, resumed = trained_and_resumed(
            "train_ldm", *mode["train"], *mode["ldm"], f"stage.model.pretrained_text_encoder={text_encoder}"
        )
        metrics = resumed["facts"]["final_metrics"]
        return resumed, (
            f"{steps} steps, resumed to {resumed['counts']['steps']}; "
            f"{metrics.get('train/steps_per_s', 0):.2f} steps/s, "
            f"{metrics.get('train/samples_per_s', 0):.1f} images/s per device, "
            f"MFU {metrics.get('perf/mfu', float('nan')):.3f}"
        )

    checks.run("train_ldm bf16 with a resume", train)

    def sample():
        sampled = stage(
            "sample", f"stage.device={mode['device']}", f"stage.prompts={json.dumps(['a red circle in the top left'])}"
        )
        return sampled, f"{sampled['counts']['images']} images"

    checks.run("sample on the device", sample)

    def evaluate():
        evaluated = stage("evaluate", f"stage.device={mode['device']}", "stage.fid.feature_extractor=null")
        return evaluated, "metrics: " + ", ".join(sorted(evaluated["facts"]["metrics"]))

    checks.run("evaluate on the device", evaluate)

    def export():
        exported = stage("export")
        registered = exported["facts"]["registered_model"]
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns.db")
        model = mlflow.pyfunc.load_model(f"models:/{registered['name']}/{registered['version']}")
        served = model.unwrap_python_model().pipeline.device.type
        [row] = model.predict(
            pd.DataFrame({"prompt": ["a red circle in the top left"], "seed": [0], "steps": [4]})
        ).to_dict("records")
        assert served == mode["device"], f"the served model runs on {served}"
        return (
            exported,
            f"{exported['facts']['pipeline']} registered as {registered['name']} v{registered['version']}, "
            f"served on {served}: {len(row['png'])} B PNG",
        )

    checks.run("export, served through the MLflow model", export)
    print(f"gpu: {checks.passed} passed, {checks.failed} failed")
    raise SystemExit(1 if checks.failed else 0)


if __name__ == "__main__":
    main()
