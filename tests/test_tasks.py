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


def test_class_conditional_trains_on_labels_samples_classes_and_exports_its_pipeline(ci_latents, tmp_path):
    common = ["experiment=ci", "task=class_conditional", f"storage.root={tmp_path}/store", f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
              f"data.raw_url={ci_latents}/store/raw"]
    classes = json.loads((ci_latents / "store" / "latents" / "_manifest.json").read_text())["facts"]["classes"]
    trained = stages.load("train_ldm").run(compose("stage=train_ldm", *common, f"stage.latents_url={ci_latents}/store/latents",
                                                   "stage.steps=6", "stage.log_every=3", "stage.sample_every=6", "stage.validation.images=4"))
    facts = trained["facts"]
    # The class vocabulary is the latents': the synthetic objects' colour and shape, an embedding each and a null one.
    assert facts["task"] == "class_conditional" and facts["classes"] == classes and "red circle" in classes
    embedder = json.loads((tmp_path / "store" / "ldm_class_conditional" / "class_embedder" / "config.json").read_text())
    assert embedder["num_classes"] == len(classes) and embedder["classes"] == classes
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    [run] = client.search_runs([client.get_experiment_by_name("ldm").experiment_id], "tags.stage = 'train_ldm'")
    assert run.data.params["world_size"] == "2" and image_steps(client, run.info.run_id, "samples") == [6]

    sampled = stages.load("sample").run(compose("stage=sample", *common, "stage.classes=[red circle,blue square]", "stage.batch_size=1"))
    folder = tmp_path / "store" / "samples_class_conditional"
    index = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert sampled["counts"] == {"images": 2, "prompts": 2} and [r["prompt"] for r in index] == ["red circle", "blue square"]
    with pytest.raises(ValueError, match="knows no class \\['green hexagon'\\]"):
        stages.load("sample").run(compose("stage=sample", *common, "stage.classes=[green hexagon]", "stage.output_url=${storage.root}/bad"))

    # Its metric: how often an image shows the class it was drawn for, against chance.
    evaluated = stages.load("evaluate").run(compose("stage=evaluate", *common))
    accuracy = evaluated["facts"]["metrics"]["classes"]
    assert accuracy["images"] == len(classes) and accuracy["chance"] == 1 / len(classes) and 0 <= accuracy["accuracy"] <= 1

    exported = stages.load("export").run(compose("stage=export", *common, "stage.log_model=false"))
    assert exported["facts"]["pipeline"] == "ClassConditionalPipeline"
    script = (
        "import sys, torch; from ldm.models.class_conditional import ClassConditionalPipeline\n"
        "pipe = ClassConditionalPipeline.from_pretrained(sys.argv[1])\n"
        "image = pipe([sys.argv[3]], num_inference_steps=int(sys.argv[4]), guidance_scale=float(sys.argv[5]),"
        " generator=torch.Generator().manual_seed(1)).images[0]\n"
        "image.save(sys.argv[2]); print(type(pipe.class_embedder).__name__)\n"
    )
    out = in_fresh_process(script, tmp_path / "store" / "export_class_conditional", tmp_path / "exported.png", "blue square",
                           sampled["facts"]["steps"], sampled["facts"]["guidance_scale"], cwd=tmp_path)
    assert out.split()[-1] == "ClassEmbedder"
    assert np.abs(pixels(tmp_path / "exported.png") - pixels(folder / "images" / "00001.png")).max() <= 2
