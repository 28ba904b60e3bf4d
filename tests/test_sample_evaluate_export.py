"""stage=sample, stage=evaluate and stage=export on a tiny trained model: seeded images, metrics, and a
diffusers pipeline directory that loads without this project and draws the same images."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import in_fresh_process
from PIL import Image
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from pipelines import stages
from pipelines.driver.config import compose

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

PROMPTS = ["a red circle in the top left on a blue background", "a white square at the bottom right, black background"]
SAMPLE = ["stage=sample", f"stage.prompts={json.dumps(PROMPTS)}"]


@pytest.fixture(scope="module")
def trained(ci_latents, tmp_path_factory):
    """A train_ldm output at the ci sizes, 10 steps of a small UNet on the shared ci latents (240 synthesized
    images, a random tiny-kl-f4 first stage); this module's outputs and MLflow runs under its own root."""
    root = tmp_path_factory.mktemp("generate")
    common = [
        "experiment=ci",
        f"storage.root={root}/store",
        f"tracking.uri=sqlite:///{root}/mlruns.db",
        f"data.raw_url={ci_latents}/store/raw",
    ]
    stages.load("train_ldm").run(
        compose(
            "stage=train_ldm",
            *common,
            f"stage.latents_url={ci_latents}/store/latents",
            "stage.steps=10",
            "stage.log_every=5",
            "stage.sample_every=10",
        )
    )
    return root, common


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_sample_is_seeded_per_image_and_guidance_changes_it(trained):
    root, common = trained
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns.db")
    first = stages.load("sample").run(compose(*SAMPLE, *common, f"stage.output_url={root}/samples"))
    index = [json.loads(line) for line in (root / "samples" / "samples.jsonl").read_text().splitlines()]
    assert [(row["prompt"], row["seed"]) for row in index] == [(PROMPTS[0], 0), (PROMPTS[1], 1)]
    images = [pixels(root / "samples" / row["file"]) for row in index]
    assert all(image.shape == (64, 64, 3) for image in images) and first["counts"]["images"] == 2
    assert (root / "samples" / "grid.png").exists()
    run = client.search_runs([client.get_experiment_by_name("ldm").experiment_id], "tags.stage = 'sample'")[0]
    logged = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "samples/images")
    }
    assert {"grid.png", "samples/images/00000.png"} <= logged

    again = stages.load("sample").run(
        compose(
            *SAMPLE,
            *common,
            f"stage.output_url={root}/again",
            "stage.prompts=[]",
            f"stage.prompts_file={_prompt_file(root)}",
        )
    )
    assert again["counts"]["prompts"] == 2
    assert all(
        np.array_equal(a, pixels(root / "again" / row["file"])) for a, row in zip(images, index)
    )  # same seeds, same images

    unguided = stages.load("sample").run(
        compose(*SAMPLE, *common, f"stage.output_url={root}/unguided", "stage.guidance_scale=1")
    )
    assert unguided["facts"]["guidance_scale"] == 1
    assert not np.array_equal(images[0], pixels(root / "unguided" / index[0]["file"]))
    reseeded = stages.load("sample").run(compose(*SAMPLE, *common, f"stage.output_url={root}/reseeded", "stage.seed=7"))
    assert reseeded["counts"]["images"] == 2 and not np.array_equal(
        images[0], pixels(root / "reseeded" / index[0]["file"])
    )

    with pytest.raises(ValueError, match="no prompts"):
        stages.load("sample").run(compose(*SAMPLE, *common, f"stage.output_url={root}/none", "stage.prompts=[]"))


def _prompt_file(root):
    path = root / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


def test_the_export_loads_in_plain_diffusers_and_draws_the_sampled_image(trained, mlflow_server, tmp_path):
    root, common = trained
    tracking = [f"tracking.uri={mlflow_server}", "tracking.experiment=export-test"]
    sampled = tmp_path / "samples"
    # One prompt per batch, as the pipeline below draws it: a batch of two rounds a little differently on CPU.
    stages.load("sample").run(compose(*SAMPLE, *common, *tracking, "stage.batch_size=1", f"stage.output_url={sampled}"))
    manifest = stages.load("export").run(
        compose("stage=export", *common, *tracking, f"stage.output_url={tmp_path}/export")
    )
    assert manifest["facts"]["pipeline"] == "LDMTextToImagePipeline" and manifest["facts"]["resolution"] == 64

    # A fresh interpreter that imports only diffusers: the directory must be all a user needs.
    script = (
        "import sys, torch; from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "size = 8 * pipe.unet.config.sample_size\n"
        "image = pipe([sys.argv[2]], height=size, width=size, num_inference_steps=4, guidance_scale=4.0,"
        " generator=torch.Generator().manual_seed(1)).images[0]\n"
        "image.save(sys.argv[3]); print(type(pipe).__name__)\n"
    )
    loaded = in_fresh_process(script, tmp_path / "export", PROMPTS[1], tmp_path / "diffusers.png", cwd=tmp_path)
    assert loaded.split()[-1] == "LDMTextToImagePipeline"
    # Equal up to float rounding: the stage and this process may split CPU reductions over different threads.
    drawn, sampled_image = (
        pixels(tmp_path / "diffusers.png").astype(int),
        pixels(sampled / "images" / "00001.png").astype(int),
    )
    assert np.abs(drawn - sampled_image).max() <= 2

    # Registered in the model registry as a pyfunc model that draws the same image.
    registered = manifest["facts"]["registered_model"]
    assert registered["name"] == "ldm-text-to-image" and registered["version"] >= 1
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{registered['name']}/{registered['version']}")
    [row] = model.predict(
        pd.DataFrame({"prompt": [PROMPTS[1]], "seed": [1], "steps": [4], "guidance_scale": [4.0]})
    ).to_dict("records")
    (tmp_path / "pyfunc.png").write_bytes(row["png"])
    assert np.array_equal(pixels(tmp_path / "pyfunc.png"), pixels(sampled / "images" / "00001.png"))


def test_evaluate_writes_reconstruction_adherence_and_fid(trained, tmp_path):
    root, common = trained
    extractor = tmp_path / "vit"
    ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).save_pretrained(extractor)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(extractor)
    manifest = stages.load("evaluate").run(
        compose(
            "stage=evaluate",
            *common,
            f"stage.fid.feature_extractor={extractor}",
            "stage.fid.images=20",
            "stage.fid.kid_subset_size=8",
            f"stage.output_url={tmp_path}/evaluation",
        )
    )
    report = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    metrics = report["metrics"]
    # Only prepare's held-out rows, which neither model trained on, are measured.
    assert report["held_out"]["fraction"] == 0.15 and report["held_out"]["rows"] >= metrics["fid"]["images"] == 20
    assert metrics["reconstruction"]["images"] == 16 and metrics["reconstruction"]["psnr"] > 0
    scores = metrics["adherence"]
    assert (scores["prompts"], scores["seeds"]) == (8, 3) and scores["colour_chance"] == 1 / 8
    for a in ("colour", "shape", "position", "background", "vertical", "horizontal", "all"):
        assert 0 <= scores[f"{a}_low"] <= scores[f"{a}_accuracy"] <= scores[f"{a}_high"] <= 1
    assert 0 <= scores["multi_object"] <= 1 and 0 <= metrics["reconstruction"]["scene_shape"] <= 1
    assert metrics["fid"]["fid"] >= 0 and np.isfinite(metrics["fid"]["kid"]) and report["skipped"] == {}
    assert manifest["facts"]["metrics"] == metrics and (tmp_path / "evaluation" / "adherence.png").exists()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns.db")
    run = client.search_runs([client.get_experiment_by_name("ldm").experiment_id], "tags.stage = 'evaluate'")[0]
    assert run.data.metrics["adherence/colour_accuracy"] == metrics["adherence"]["colour_accuracy"]
    assert run.data.metrics["fid/fid"] == pytest.approx(metrics["fid"]["fid"])
    # Each generated image is a row of an MLflow table: its prompt, seed, template, and what was asked and seen.
    table = client.load_table(run.info.experiment_id, "adherence_per_image.json", run_ids=[run.info.run_id])
    assert len(table) == 24 and {"prompt", "seed", "template", "colour", "seen_colour", "objects"} <= set(table.columns)

    bare = stages.load("evaluate").run(
        compose(
            "stage=evaluate",
            *common,
            "stage.reconstruction.enabled=false",
            "stage.adherence.enabled=false",
            f"stage.output_url={tmp_path}/bare",
        )
    )
    assert bare["facts"]["metrics"] == {} and "stage.fid.feature_extractor is null" in bare["facts"]["skipped"]["fid"]
