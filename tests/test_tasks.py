"""The paper's other tasks through the same stages (task=<name>): each trains a tiny model on 2 Ray Train
workers from the shared ci latents, samples from it, and exports the diffusers pipeline that matches it, which
loads in a fresh process without this project and draws the images the sample stage drew."""

import json

import mlflow
import numpy as np
import pytest
from conftest import history, image_steps, in_fresh_process
from PIL import Image

from pipelines import stages
from pipelines.config import compose

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_unconditional_trains_samples_and_exports_diffusers_ldm_pipeline(ci_latents, tmp_path):
    common = ["experiment=ci", "task=unconditional", f"storage.root={tmp_path}/store", f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
              f"data.raw_url={ci_latents}/store/raw"]  # the synthetic corpus: what evaluate compares the scenes with
    trained = stages.load("train_ldm").run(compose("stage=train_ldm", *common, f"stage.latents_url={ci_latents}/store/latents",
                                                   "stage.steps=6", "stage.log_every=3", "stage.sample_every=6", "stage.validation.images=4"))
    facts = trained["facts"]
    assert facts["task"] == "unconditional" and facts["pipeline"] == "LDMPipeline" and not facts["text_encoder_trained"]
    assert "tokenizer" not in facts["layout"] and not (tmp_path / "store" / "ldm_unconditional" / "text_encoder").exists()
    unet_config = json.loads((tmp_path / "store" / "ldm_unconditional" / "unet" / "config.json").read_text())
    assert unet_config["_class_name"] == "UNet2DModel" and unet_config["in_channels"] == facts["latent_shape"][0]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    [run] = client.search_runs([client.get_experiment_by_name("ldm").experiment_id], "tags.stage = 'train_ldm'")
    assert run.data.params["world_size"] == "2" and len(history(client, run.info.run_id, "train/loss")) == 2
    assert image_steps(client, run.info.run_id, "samples") == [6]  # its validation grid: 4 images from fixed seeds

    # Without prompts: stage.num_images images, image i from seed stage.seed + i.
    sampled = stages.load("sample").run(compose("stage=sample", *common, "stage.num_images=3", "stage.batch_size=1"))
    index = [json.loads(line) for line in (tmp_path / "store" / "samples_unconditional" / "samples.jsonl").read_text().splitlines()]
    assert sampled["counts"] == {"images": 3, "prompts": 0} and [(r["prompt"], r["seed"]) for r in index] == [(None, 0), (None, 1), (None, 2)]
    first, second = (pixels(tmp_path / "store" / "samples_unconditional" / "images" / f"0000{i}.png") for i in (0, 1))
    assert first.shape == (64, 64, 3) and np.abs(first - second).max() > 0

    # Its metric: the generated scenes' attributes against the data's, and the fraction of clean images.
    evaluated = stages.load("evaluate").run(compose("stage=evaluate", *common))
    scenes = evaluated["facts"]["metrics"]["scenes"]
    assert scenes["images"] == 16 and 0 <= scenes["tv"] <= 1 and 0 <= scenes["clean_fraction"] <= 1 and "adherence" not in evaluated["facts"]["metrics"]

    exported = stages.load("export").run(compose("stage=export", *common, "stage.log_model=false"))
    assert exported["facts"]["pipeline"] == "LDMPipeline" and exported["facts"]["resolution"] == 64
    script = (
        "import sys, torch; from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "image = pipe(batch_size=1, num_inference_steps=int(sys.argv[3]), generator=torch.Generator().manual_seed(1)).images[0]\n"
        "image.save(sys.argv[2]); print(type(pipe).__name__)\n"
    )
    out = in_fresh_process(script, tmp_path / "store" / "export_unconditional", tmp_path / "diffusers.png", sampled["facts"]["steps"], cwd=tmp_path)
    assert out.split()[-1] == "LDMPipeline"
    assert np.abs(pixels(tmp_path / "diffusers.png") - second).max() <= 2
