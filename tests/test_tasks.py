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
from pipelines.driver.config import compose

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_unconditional_trains_samples_and_exports_diffusers_ldm_pipeline(ci_latents, tmp_path):
    common = [
        "experiment=ci",
        "task=unconditional",
        f"storage.root={tmp_path}/store",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
        f"data.raw_url={ci_latents}/store/raw",
    ]  # the synthetic corpus: what evaluate compares the scenes with
    trained = stages.load("train_ldm").run(
        compose(
            "stage=train_ldm",
            *common,
            f"stage.latents_url={ci_latents}/store/latents",
            "stage.steps=6",
            "stage.log_every=3",
            "stage.sample_every=6",
            "stage.validation.images=4",
        )
    )
    facts = trained["facts"]
    assert facts["task"] == "unconditional" and facts["pipeline"] == "LDMPipeline" and not facts["text_encoder_trained"]
    assert (
        "tokenizer" not in facts["layout"] and not (tmp_path / "store" / "ldm_unconditional" / "text_encoder").exists()
    )
    unet_config = json.loads((tmp_path / "store" / "ldm_unconditional" / "unet" / "config.json").read_text())
    assert unet_config["_class_name"] == "UNet2DModel" and unet_config["in_channels"] == facts["latent_shape"][0]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    [run] = client.search_runs([client.get_experiment_by_name("ldm").experiment_id], "tags.stage = 'train_ldm'")
    assert run.data.params["world_size"] == "2" and len(history(client, run.info.run_id, "train/loss")) == 2
    assert image_steps(client, run.info.run_id, "samples") == [6]  # its validation grid: 4 images from fixed seeds

    # Without prompts: stage.num_images images, image i from seed stage.seed + i.
    sampled = stages.load("sample").run(compose("stage=sample", *common, "stage.num_images=3", "stage.batch_size=1"))
    index = [
        json.loads(line)
        for line in (tmp_path / "store" / "samples_unconditional" / "samples.jsonl").read_text().splitlines()
    ]
    assert sampled["counts"] == {"images": 3, "prompts": 0} and [(r["prompt"], r["seed"]) for r in index] == [
        (None, 0),
        (None, 1),
        (None, 2),
    ]
    first, second = (pixels(tmp_path / "store" / "samples_unconditional" / "images" / f"0000{i}.png") for i in (0, 1))
    assert first.shape == (64, 64, 3) and np.abs(first - second).max() > 0

    # Its metric: the generated scenes' attributes against the data's, and the fraction of clean images.
    evaluated = stages.load("evaluate").run(compose("stage=evaluate", *common))
    scenes = evaluated["facts"]["metrics"]["scenes"]
    assert (
        scenes["images"] == 16
        and 0 <= scenes["tv"] <= 1
        and 0 <= scenes["clean_fraction"] <= 1
        and "adherence" not in evaluated["facts"]["metrics"]
    )

    exported = stages.load("export").run(compose("stage=export", *common, "stage.log_model=false"))
    assert exported["facts"]["pipeline"] == "LDMPipeline" and exported["facts"]["resolution"] == 64
    script = (
        "import sys, torch; from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "image = pipe(batch_size=1, num_inference_steps=int(sys.argv[3]),"
        " generator=torch.Generator().manual_seed(1)).images[0]\n"
        "image.save(sys.argv[2]); print(type(pipe).__name__)\n"
    )
    out = in_fresh_process(
        script,
        tmp_path / "store" / "export_unconditional",
        tmp_path / "diffusers.png",
        sampled["facts"]["steps"],
        cwd=tmp_path,
    )
    assert out.split()[-1] == "LDMPipeline"
    assert np.abs(pixels(tmp_path / "diffusers.png") - second).max() <= 2


def test_class_conditional_trains_on_labels_samples_classes_and_exports_its_pipeline(ci_latents, tmp_path):
    common = [
        "experiment=ci",
        "task=class_conditional",
        f"storage.root={tmp_path}/store",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
        f"data.raw_url={ci_latents}/store/raw",
    ]
    classes = json.loads((ci_latents / "store" / "latents" / "_manifest.json").read_text())["facts"]["classes"]
    trained = stages.load("train_ldm").run(
        compose(
            "stage=train_ldm",
            *common,
            f"stage.latents_url={ci_latents}/store/latents",
            "stage.steps=6",
            "stage.log_every=3",
            "stage.sample_every=6",
            "stage.validation.images=4",
        )
    )
    facts = trained["facts"]
    # The class vocabulary is the latents': the synthetic objects' colour and shape, an embedding each and a null one.
    assert facts["task"] == "class_conditional" and facts["classes"] == classes and "red circle" in classes
    embedder = json.loads((tmp_path / "store" / "ldm_class_conditional" / "conditioner" / "config.json").read_text())
    assert (
        embedder["_class_name"] == "ClassEmbedder"
        and embedder["num_classes"] == len(classes)
        and embedder["classes"] == classes
    )
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    [run] = client.search_runs([client.get_experiment_by_name("ldm").experiment_id], "tags.stage = 'train_ldm'")
    assert run.data.params["world_size"] == "2" and image_steps(client, run.info.run_id, "samples") == [6]

    sampled = stages.load("sample").run(
        compose("stage=sample", *common, "stage.classes=[red circle,blue square]", "stage.batch_size=1")
    )
    folder = tmp_path / "store" / "samples_class_conditional"
    index = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert sampled["counts"] == {"images": 2, "prompts": 2} and [r["prompt"] for r in index] == [
        "red circle",
        "blue square",
    ]
    with pytest.raises(ValueError, match="knows no class \\['green hexagon'\\]"):
        stages.load("sample").run(
            compose("stage=sample", *common, "stage.classes=[green hexagon]", "stage.output_url=${storage.root}/bad")
        )

    # Its metric: how often an image shows the class it was drawn for, against chance.
    evaluated = stages.load("evaluate").run(compose("stage=evaluate", *common))
    accuracy = evaluated["facts"]["metrics"]["classes"]
    assert (
        accuracy["images"] == len(classes) and accuracy["chance"] == 1 / len(classes) and 0 <= accuracy["accuracy"] <= 1
    )

    exported = stages.load("export").run(compose("stage=export", *common, "stage.log_model=false"))
    assert exported["facts"]["pipeline"] == "ConditionedPipeline"
    script = (
        "import sys, torch; from ldm.models.conditioners import ConditionedPipeline\n"
        "pipe = ConditionedPipeline.from_pretrained(sys.argv[1])\n"
        "image = pipe([sys.argv[3]], num_inference_steps=int(sys.argv[4]), guidance_scale=float(sys.argv[5]),"
        " generator=torch.Generator().manual_seed(1)).images[0]\n"
        "image.save(sys.argv[2]); print(type(pipe.conditioner).__name__)\n"
    )
    out = in_fresh_process(
        script,
        tmp_path / "store" / "export_class_conditional",
        tmp_path / "exported.png",
        "blue square",
        sampled["facts"]["steps"],
        sampled["facts"]["guidance_scale"],
        cwd=tmp_path,
    )
    assert out.split()[-1] == "ClassEmbedder"
    assert np.abs(pixels(tmp_path / "exported.png") - pixels(folder / "images" / "00001.png")).max() <= 2


def test_layout_to_image_trains_on_boxes_samples_layouts_and_exports_its_pipeline(ci_latents, tmp_path):
    common = [
        "experiment=ci",
        "task=layout_to_image",
        f"storage.root={tmp_path}/store",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
        f"data.raw_url={ci_latents}/store/raw",
    ]
    manifest = json.loads((ci_latents / "store" / "latents" / "_manifest.json").read_text())
    assert (
        manifest["facts"]["rows_with_boxes"] == manifest["counts"]["rows_out"]
    )  # every synthetic row has its object's box
    trained = stages.load("train_ldm").run(
        compose(
            "stage=train_ldm",
            *common,
            f"stage.latents_url={ci_latents}/store/latents",
            "stage.steps=6",
            "stage.log_every=3",
            "stage.sample_every=6",
            "stage.validation.images=4",
        )
    )
    assert trained["facts"]["task"] == "layout_to_image" and trained["facts"]["pipeline"] == "ConditionedPipeline"
    encoder = json.loads((tmp_path / "store" / "ldm_layout_to_image" / "conditioner" / "config.json").read_text())
    assert encoder["_class_name"] == "LayoutEncoder" and (encoder["max_objects"], encoder["grid"]) == (8, 16)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    [run] = client.search_runs([client.get_experiment_by_name("ldm").experiment_id], "tags.stage = 'train_ldm'")
    assert run.data.params["world_size"] == "2" and image_steps(client, run.info.run_id, "samples") == [6]

    layout = [{"label": "red circle", "box": [0.1, 0.1, 0.45, 0.45]}]
    sampled = stages.load("sample").run(
        compose(
            "stage=sample",
            *common,
            f"stage.layouts=['{json.dumps(layout)}']",
            "stage.images_per_prompt=2",
            "stage.batch_size=1",
        )
    )
    folder = tmp_path / "store" / "samples_layout_to_image"
    index = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert sampled["counts"] == {"images": 2, "prompts": 1} and [json.loads(r["prompt"]) for r in index] == [
        layout,
        layout,
    ]
    with pytest.raises(ValueError, match=r"stage.layouts\[0\]: the model knows no class \['green hexagon'\]"):
        stages.load("sample").run(
            compose(
                "stage=sample",
                *common,
                'stage.layouts=[\'[{"label": "green hexagon", "box": [0, 0, 1, 1]}]\']',
                "stage.output_url=${storage.root}/bad",
            )
        )
    with pytest.raises(ValueError, match=r"stage.layouts\[0\]: layout .* expected a list of"):
        stages.load("sample").run(
            compose(
                "stage=sample",
                *common,
                'stage.layouts=[\'[{"label": "red circle", "box": [0.5, 0, 0.2, 1]}]\']',
                "stage.output_url=${storage.root}/bad",
            )
        )

    # Its metric: box IoU, position and class of the object drawn for each held-out layout,
    # against between-layout chance.
    evaluated = stages.load("evaluate").run(compose("stage=evaluate", *common))
    accuracy = evaluated["facts"]["metrics"]["layouts"]
    assert accuracy["images"] == 8 and 0 <= accuracy["iou"] <= 1 and 0 < accuracy["chance_position"] < 1

    exported = stages.load("export").run(compose("stage=export", *common, "stage.log_model=false"))
    assert exported["facts"]["pipeline"] == "ConditionedPipeline"
    script = (
        "import json, sys, torch; from ldm.models.conditioners import ConditionedPipeline\n"
        "pipe = ConditionedPipeline.from_pretrained(sys.argv[1])\n"
        "image = pipe([json.loads(sys.argv[3])], num_inference_steps=int(sys.argv[4]),"
        " guidance_scale=float(sys.argv[5]), generator=torch.Generator().manual_seed(1)).images[0]\n"
        "image.save(sys.argv[2]); print(type(pipe.conditioner).__name__)\n"
    )
    out = in_fresh_process(
        script,
        tmp_path / "store" / "export_layout_to_image",
        tmp_path / "exported.png",
        json.dumps(layout),
        sampled["facts"]["steps"],
        sampled["facts"]["guidance_scale"],
        cwd=tmp_path,
    )
    assert out.split()[-1] == "LayoutEncoder"
    assert np.abs(pixels(tmp_path / "exported.png") - pixels(folder / "images" / "00001.png")).max() <= 2


def image_task_latents(ci_latents, tmp_path, task: str, latent_channels: int) -> list[str]:
    """The ci corpus's prepared rows encoded for ``task`` (with what it concatenates to z_t) under a random tiny
    first stage of ``latent_channels``; the overrides every stage of the test shares."""
    from ldm.models.first_stage import build_first_stage
    from ldm.models.presets import first_stage_preset

    build_first_stage(
        first_stage_preset("tiny-kl-f4", latent_channels=latent_channels), logvar_bias=-6.0
    ).save_pretrained(tmp_path / "first_stage")
    common = [
        "experiment=ci",
        f"task={task}",
        f"storage.root={tmp_path}/store",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
        f"data.prepared_url={ci_latents}/store/prepared",
        f"data.raw_url={ci_latents}/store/raw",
    ]
    encoded = stages.load("encode_latents").run(
        compose("stage=encode_latents", *common, f"stage.first_stage={tmp_path}/first_stage")
    )
    assert encoded["facts"]["concat"] == {"super_resolution": "low_res", "inpainting": "masked"}[task]
    assert (tmp_path / "store" / f"latents_{task}" / "_manifest.json").exists()  # apart from the other tasks' latents
    return common


def test_super_resolution_trains_on_low_resolution_images_and_exports_diffusers_pipeline(ci_latents, tmp_path):
    import pyarrow.parquet as pq

    common = image_task_latents(ci_latents, tmp_path, "super_resolution", latent_channels=3)
    [shard, *_] = sorted((tmp_path / "store" / "latents_super_resolution" / "shards").glob("*.parquet"))
    low = pq.read_table(shard, columns=["low_res"])["low_res"].combine_chunks().to_numpy_ndarray()
    assert low.shape[1:] == (16, 16, 3) and low.dtype == np.uint8  # the 64 px image at the f=4 latent's size
    # Latents without the low-resolution images (or with them, for a task without) are refused before anything starts.
    with pytest.raises(
        ValueError,
        match="was encoded with concat=None, the task concatenates low_res to z_t: "
        "run stage=encode_latents task=super_resolution",
    ):
        stages.load("train_ldm").run(
            compose("stage=train_ldm", *common, f"stage.latents_url={ci_latents}/store/latents")
        )
    with pytest.raises(ValueError, match="was encoded with concat=low_res, the task concatenates None"):
        stages.load("train_ldm").run(
            compose(
                "stage=train_ldm",
                *common,
                "task=unconditional",
                f"stage.latents_url={tmp_path}/store/latents_super_resolution",
            )
        )
    trained = stages.load("train_ldm").run(
        compose(
            "stage=train_ldm",
            *common,
            "stage.steps=6",
            "stage.log_every=3",
            "stage.sample_every=6",
            "stage.validation.images=2",
        )
    )
    assert trained["facts"]["pipeline"] == "LDMSuperResolutionPipeline"
    unet = json.loads((tmp_path / "store" / "ldm_super_resolution" / "unet" / "config.json").read_text())
    assert (unet["_class_name"], unet["in_channels"], unet["out_channels"]) == ("UNet2DModel", 6, 3)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    [run] = client.search_runs([client.get_experiment_by_name("ldm").experiment_id], "tags.stage = 'train_ldm'")
    assert run.data.params["world_size"] == "2" and image_steps(client, run.info.run_id, "samples") == [6]

    # A user's low-resolution image, upsampled x4.
    Image.fromarray(low[0]).save(tmp_path / "low.png")
    sampled = stages.load("sample").run(
        compose("stage=sample", *common, f"stage.images=[{tmp_path}/low.png]", "stage.batch_size=1")
    )
    folder = tmp_path / "store" / "samples_super_resolution"
    [row] = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert row["input"] == f"{tmp_path}/low.png" and pixels(folder / "images" / "00000.png").shape == (64, 64, 3)

    # Its metric: PSNR / SSIM against the held-out originals, beside bicubic upsampling of the same inputs.
    scores = stages.load("evaluate").run(compose("stage=evaluate", *common))["facts"]["metrics"]["super_resolution"]
    assert scores["images"] == 8 and scores["factor"] == 4 and scores["bicubic_psnr"] > 15 and 0 < scores["psnr"]

    exported = stages.load("export").run(compose("stage=export", *common, "stage.log_model=false"))
    assert exported["facts"]["pipeline"] == "LDMSuperResolutionPipeline"
    script = (
        "import sys, numpy as np, torch; from PIL import Image; from diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "low = torch.from_numpy(np.asarray(Image.open(sys.argv[3]).convert('RGB'), dtype=np.float32) / 127.5 - 1)"
        ".permute(2, 0, 1)[None]\n"
        "image = pipe(low, num_inference_steps=int(sys.argv[4]),"
        " generator=torch.Generator().manual_seed(0)).images[0]\n"
        "image.save(sys.argv[2]); print(type(pipe).__name__)\n"
    )
    out = in_fresh_process(
        script,
        tmp_path / "store" / "export_super_resolution",
        tmp_path / "exported.png",
        tmp_path / "low.png",
        sampled["facts"]["steps"],
        cwd=tmp_path,
    )
    assert out.split()[-1] == "LDMSuperResolutionPipeline"
    assert np.abs(pixels(tmp_path / "exported.png") - pixels(folder / "images" / "00000.png")).max() <= 2


def test_inpainting_trains_on_masked_latents_fills_holes_and_exports_its_pipeline(ci_latents, tmp_path):
    import pyarrow.parquet as pq

    common = image_task_latents(ci_latents, tmp_path, "inpainting", latent_channels=4)
    [shard, *_] = sorted((tmp_path / "store" / "latents_inpainting" / "shards").glob("*.parquet"))
    table = pq.read_table(shard, columns=["mask", "masked_latent"])
    masks = table["mask"].combine_chunks().to_numpy_ndarray()
    assert masks.shape[1:] == (16, 16) and table["masked_latent"].type.shape == [4, 16, 16]
    assert 0.02 < masks.mean() < 0.8 and len({m.tobytes() for m in masks}) == len(
        masks
    )  # a hole of its own for every row
    trained = stages.load("train_ldm").run(
        compose(
            "stage=train_ldm",
            *common,
            "stage.steps=6",
            "stage.log_every=3",
            "stage.sample_every=6",
            "stage.validation.images=2",
        )
    )
    assert trained["facts"]["pipeline"] == "InpaintingPipeline"
    unet = json.loads((tmp_path / "store" / "ldm_inpainting" / "unet" / "config.json").read_text())
    assert (unet["in_channels"], unet["out_channels"]) == (4 + 1 + 4, 4)

    sampled = stages.load("sample").run(compose("stage=sample", *common, "stage.num_images=2", "stage.batch_size=1"))
    folder = tmp_path / "store" / "samples_inpainting"
    index = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert sampled["counts"]["images"] == 2 and all(row["input"] for row in index)  # held-out rows, by key

    scores = stages.load("evaluate").run(compose("stage=evaluate", *common))["facts"]["metrics"]["inpainting"]
    assert (
        scores["images"] == 8
        and 0 < scores["hole_fraction"] < 1
        and scores["mean_fill_psnr_hole"] > 5
        and scores["psnr_outside"] > 0
    )

    # A user's image and mask (white: the hole), as files.
    image = pixels(folder / "images" / "00000.png").astype(np.uint8)
    hole = np.zeros((64, 64), np.uint8)
    hole[8:40, 20:56] = 255
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(hole).save(tmp_path / "hole.png")
    with pytest.raises(
        ValueError, match=r"stage.masks: 2 mask\(s\) for 1 image\(s\) in stage.images: expected one each"
    ):
        stages.load("sample").run(
            compose(
                "stage=sample",
                *common,
                f"stage.images=[{tmp_path}/image.png]",
                f"stage.masks=[{tmp_path}/hole.png,{tmp_path}/hole.png]",
            )
        )
    given = stages.load("sample").run(
        compose(
            "stage=sample",
            *common,
            f"stage.images=[{tmp_path}/image.png]",
            f"stage.masks=[{tmp_path}/hole.png]",
            f"stage.output_url={tmp_path}/filled",
        )
    )
    [row] = [json.loads(line) for line in (tmp_path / "filled" / "samples.jsonl").read_text().splitlines()]
    assert (
        given["counts"]["images"] == 1
        and row["input"] == f"{tmp_path}/image.png"
        and row["mask"] == f"{tmp_path}/hole.png"
    )

    exported = stages.load("export").run(compose("stage=export", *common, "stage.log_model=false"))
    assert exported["facts"]["pipeline"] == "InpaintingPipeline"
    np.save(tmp_path / "image.npy", image[None])
    np.save(tmp_path / "mask.npy", (hole[None] > 0).astype(np.uint8))
    script = (
        "import sys, numpy as np, torch; from ldm.models.image_conditioned import InpaintingPipeline\n"
        "pipe = InpaintingPipeline.from_pretrained(sys.argv[1])\n"
        "image = pipe(np.load(sys.argv[3]), np.load(sys.argv[4]), num_inference_steps=int(sys.argv[5]),"
        " generator=torch.Generator().manual_seed(0)).images[0]\n"
        "image.save(sys.argv[2]); print(type(pipe).__name__)\n"
    )
    out = in_fresh_process(
        script,
        tmp_path / "store" / "export_inpainting",
        tmp_path / "exported.png",
        tmp_path / "image.npy",
        tmp_path / "mask.npy",
        sampled["facts"]["steps"],
        cwd=tmp_path,
    )
    assert out.split()[-1] == "InpaintingPipeline"
    assert np.abs(pixels(tmp_path / "exported.png") - pixels(tmp_path / "filled" / "images" / "00000.png")).max() <= 2
