"""The typed config: every option of conf/ is checked against its schema when Hydra composes it, so a wrong
type, an unknown choice or an unknown key is Hydra's error naming the key, before anything runs."""

import dataclasses
import json
import os
import subprocess
import sys
import typing
from enum import Enum

import pytest
import yaml
from conftest import ROOT
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ldm.models.presets import describe, first_stage_preset, text_to_image_preset
from pipelines import stages
from pipelines.driver.config import compose
from pipelines.schema import OPTIONS

CONF = ROOT / "conf"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "pipelines/run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def choices(schema: type, prefix: str = "") -> dict[str, type[Enum]]:
    """key -> enum class of every choice-typed setting of a schema class, lists of choices included."""
    found = {}
    for name, hint in typing.get_type_hints(schema).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if typing.get_origin(hint) in (typing.Union, list) and len(args) == 1 else hint
        if dataclasses.is_dataclass(hint):
            found.update(choices(hint, f"{prefix}{name}."))
        elif isinstance(hint, type) and issubclass(hint, Enum):
            found[f"{prefix}{name}"] = hint
    return found


def test_every_option_names_its_schema_first_and_every_schema_has_its_option():
    for group, options in OPTIONS.items():
        assert sorted(p.stem for p in (CONF / group).glob("*.yaml")) == sorted(options), group
        for option in options:
            defaults = yaml.safe_load((CONF / group / f"{option}.yaml").read_text())["defaults"]
            schema = f"/schema/{group}/{option}@_here_"
            assert schema in defaults, f"conf/{group}/{option}.yaml does not name {schema}"
            # first, or right after the option it extends (whose schema it subclasses)
            assert defaults.index(schema) <= 1 and defaults.index(schema) < defaults.index("_self_")
    assert sorted(stages.STAGES) == sorted(OPTIONS["stage"])


@pytest.mark.parametrize("stage", sorted(set(stages.STAGES) - {"pipeline"}))
def test_an_unknown_choice_of_every_choice_setting_is_refused_naming_the_key(stage):
    cfg = compose(f"stage={stage}")
    found = {f"stage.{k}": v for k, v in choices(OmegaConf.get_type(cfg.stage)).items()}
    found.update({f"data.{k}": v for k, v in choices(OmegaConf.get_type(cfg.data)).items()})
    assert found, f"stage={stage} has no choice settings"
    for key, enum in found.items():
        value = (
            "[not-a-choice]"
            if OmegaConf.is_list(OmegaConf.select(cfg, key, throw_on_missing=False))
            else "not-a-choice"
        )
        with pytest.raises(ConfigCompositionException) as error:
            compose(f"stage={stage}", f"{key}={value}")
        message = str(error.value) + str(error.value.__cause__)
        assert key in message and "not-a-choice" in message, message
        assert all(member.name in message for member in enum), f"{key}: the error should list the choices"


def test_the_choice_settings_users_meet_first_are_typed():
    """The choice settings users get wrong first are among those the schema walk finds, so it cannot skip them."""
    every = {}
    for stage in set(stages.STAGES) - {"pipeline"}:
        every.update({f"{stage}:{k}": v for k, v in choices(OPTIONS["stage"][stage]).items()})
    every.update({f"data:{k}": v for k, v in choices(OPTIONS["data"]["synthetic"]).items()})
    for key in (
        "train_ldm:noise.prediction_type",
        "train_ldm:noise.schedule",
        "train_ldm:optimizer.schedule",
        "train_ldm:scaling.placement_strategy",
        "train_ldm:validation.sampler",
        "train_ldm:model.preset",
        "train_ldm:attention",
        "train_autoencoder:model.preset",
        "train_autoencoder:optimizer.schedule",
        "sample:sampler",
        "sample:weights",
        "sample:device",
        "evaluate:weights",
        "export:sampler",
        "encode_latents:resources.dtype",
        "encode_latents:compression",
        "synthesize:formats",
        "prepare:img2dataset.output_format",
        "data:input.format",
    ):
        assert key in every, key


def test_a_wrong_type_or_an_unknown_key_is_refused_at_compose_time():
    for override, key in (
        ("stage.steps=abc", "stage.steps"),
        ("stage.nope=1", "nope"),
        ("stage.scaling.use_gpu=maybe", "stage.scaling.use_gpu"),
        ("cluster.num_cpus=four", "cluster.num_cpus"),
        ("storage.shared=sometimes", "storage.shared"),
    ):
        with pytest.raises(ConfigCompositionException) as error:
            compose("stage=train_ldm", override)
        assert key in str(error.value) + str(error.value.__cause__)


@pytest.mark.parametrize(
    "args, key",
    [
        (["stage=synthesize", "data.num_samples=abc"], "data.num_samples"),
        (["stage=train_ldm", "stage.noise.prediction_type=nope"], "stage.noise.prediction_type"),
    ],
)
def test_the_cli_refuses_a_bad_value_with_hydras_error_and_no_traceback(args, key):
    result = run_cli(*args)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"full_key: {key}" in output and "Traceback" not in output
    assert "Ray" not in output  # nothing started


def test_a_value_left_unset_is_named_before_anything_runs():
    result = run_cli("stage=prepare", "data=laion400m_metadata")
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Missing mandatory value" in output and "data.input.url" in output
    assert "Traceback" not in output
    # A tracking server's URI comes from tracking.uri or MLFLOW_TRACKING_URI: with neither, the run never starts.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(
        [sys.executable, "pipelines/run.py", "stage=evaluate", "tracking=server"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2 and "MLFLOW_TRACKING_URI" in result.stderr and "tracking.uri" in result.stderr


def test_experiments_compose_for_their_stages():
    quality = compose("experiment=quality")
    assert (
        quality.stage.name == "pipeline"
        and quality.stage.train_ldm.steps == 2400
        and quality.stage.evaluate.guidance_scale == 4.0
    )
    assert str(quality.stage.sample.weights) == "raw" and quality.data.num_samples == 5000
    for stage in stages.STAGES:
        cfg = compose(f"stage={stage}", "experiment=ci")
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        assert cfg.data.num_samples == 240
    assert compose("stage=train_ldm", "experiment=ci").stage.batch_size == 8
    pipeline = compose("stage=pipeline", "experiment=ci").stage
    assert (
        pipeline.train_ldm.batch_size == 8
        and pipeline.train_ldm.steps == 12
        and pipeline.synthesize.rows_per_shard == 60
    )


def test_ray_train_workers_get_the_typed_stage():
    settings = OmegaConf.to_object(compose("stage=train_ldm", "stage.noise.prediction_type=v_prediction").stage)
    assert type(settings).__name__ == "TrainLdm" and settings.noise.prediction_type == "v_prediction"
    assert f"{settings.validation.sampler}" == "ddim" and isinstance(settings.scaling.num_workers, int)


@pytest.mark.parametrize(
    "stage, node", [("train_ldm", lambda s: s), ("pipeline", lambda s: s.train_ldm)], ids=["train_ldm", "pipeline"]
)
def test_command_line_overrides_of_a_presets_fields_reach_the_model(stage, node):
    """What a user types (stage.model.unet.<field>=...) reaches the preset as the driver reads it (a DictConfig)
    and as a Ray Train worker does (the schema's dataclass); unset fields keep the preset's; the run name is a
    hash of the preset's JSON."""
    prefix = "stage." if stage == "train_ldm" else "stage.train_ldm."
    cfg = compose(
        f"stage={stage}",
        f"{prefix}model.unet.block_out_channels=[32,32,64]",
        f"{prefix}model.unet.self_attention_levels=[]",
        f"{prefix}model.text_encoder.kind=ldmbert",
    )
    for model in (node(cfg.stage).model, OmegaConf.to_object(node(cfg.stage)).model):
        spec = text_to_image_preset(model.preset, model.unet, model.text_encoder)
        assert spec.unet.block_out_channels == (32, 32, 64) and spec.unet.self_attention_levels == ()
        assert (
            spec.unet.layers_per_block == 1 and spec.text_encoder.kind == "ldmbert" and spec.text_encoder.width == 128
        )
        assert json.loads(json.dumps(describe(spec)))["unet"]["block_out_channels"] == [32, 32, 64]
    with pytest.raises(ConfigCompositionException, match="channels"):  # a field the UNet does not have, named
        compose(f"stage={stage}", f"{prefix}model.unet.channels=[32]")


def test_a_command_line_override_of_a_first_stage_presets_field_reaches_the_model():
    settings = compose("stage=train_autoencoder", "stage.model.overrides.layers_per_block=2").stage
    for model in (settings.model, OmegaConf.to_object(settings).model):  # the driver's, and a Ray Train worker's
        spec = first_stage_preset(model.preset, model.overrides, latent_channels=3)
        assert (spec.layers_per_block, spec.latent_channels, spec.block_out_channels) == (2, 3, (32, 64, 64))


def test_one_task_choice_sets_what_every_stage_of_the_workflow_needs():
    plain = compose("stage=pipeline").stage
    assert plain.train_ldm.latents_url == plain.encode_latents.output_url and plain.encode_latents.output_url.endswith(
        "/latents"
    )
    assert plain.train_autoencoder.model.latent_channels is None and plain.train_autoencoder.output_url.endswith(
        "/autoencoder"
    )
    # Super-resolution: its own 3-channel first stage and latents (with the low-resolution images), its own outputs.
    sr = compose("stage=pipeline", "task=super_resolution").stage
    assert sr.train_autoencoder.model.latent_channels == 3 and sr.train_autoencoder.output_url.endswith(
        "/autoencoder_c3"
    )
    assert sr.encode_latents.first_stage == sr.train_autoencoder.output_url
    assert (
        sr.encode_latents.output_url.endswith("/latents_super_resolution")
        and sr.train_ldm.latents_url == sr.encode_latents.output_url
    )
    assert [sr[s].output_url.rsplit("/", 1)[-1] for s in ("train_ldm", "sample", "evaluate", "export")] == [
        f"{name}_super_resolution" for name in ("ldm", "samples", "evaluation", "export")
    ]
    # Inpainting: latents of its own (masks, masked latents), the first stage everyone else's.
    inpainting = compose("stage=pipeline", "task=inpainting").stage
    assert inpainting.encode_latents.output_url.endswith(
        "/latents_inpainting"
    ) and inpainting.train_autoencoder.output_url.endswith("/autoencoder")
    # The tasks that only change what conditions the UNet share the text-to-image latents.
    for task in ("unconditional", "class_conditional", "layout_to_image"):
        assert (
            compose("stage=pipeline", f"task={task}").stage.encode_latents.output_url == plain.encode_latents.output_url
        )
    assert compose("stage=sample", "task=layout_to_image", "task.grid=32").task.grid == 32
    with pytest.raises(ConfigCompositionException, match="task"):
        compose("stage=train_ldm", "task=depth_to_image")


@pytest.mark.parametrize("stage", ["train_autoencoder", "train_ldm"])
def test_each_setting_counts_for_what_its_schema_field_declares(stage):
    """An operational setting leaves the output and the run as they are; a run-extent one makes another output of
    the same run; a content one, another output and another run."""
    from pipelines.driver.stage import stage_fingerprint, task_identity
    from pipelines.driver.trainer import training_identity

    def identities(*overrides: str) -> tuple[str, str]:
        cfg = compose(f"stage={stage}", *overrides)
        return stage_fingerprint(cfg, 1, ["input"], True), training_identity(cfg, ["input"])

    output, run = identities()
    assert identities("stage.log_every=7", "stage.keep_checkpoints=9") == (output, run)
    assert identities("data.validation_prompts=[a red circle]") == (output, run)
    more = identities("stage.steps=12345")
    assert more[0] != output and more[1] == run
    other = identities("stage.seed=12345")
    assert other[0] != output and other[1] != run
    # The task: where its outputs go is not what its model is.
    layout = task_identity(compose(f"stage={stage}", "task=layout_to_image"))
    assert task_identity(compose(f"stage={stage}", "task=layout_to_image", "task.latents_suffix=_x")) == layout
    assert task_identity(compose(f"stage={stage}", "task=layout_to_image", "task.grid=32")) != layout


def test_every_declared_role_is_one_the_fingerprints_know():
    from pipelines.schema import CONTENT, OPERATIONAL, RUN_EXTENT, roles

    declared = {
        f"{schema.__name__}.{name}": role
        for options in OPTIONS.values()
        for schema in options.values()
        for name, role in roles(schema).items()
    }
    assert set(declared.values()) <= {CONTENT, OPERATIONAL, RUN_EXTENT}
    assert declared["TrainLdm.log_every"] == OPERATIONAL and declared["TrainLdm.steps"] == RUN_EXTENT
