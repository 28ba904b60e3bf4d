"""What a user sees from `python pipelines/run.py` when the command line is wrong."""

import subprocess
import sys

from conftest import ROOT

from pipelines import stages


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "pipelines/run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_every_stage_config_has_a_stage_module():
    configs = sorted(p.stem for p in (ROOT / "conf" / "stage").glob("*.yaml"))
    assert configs == sorted(stages.STAGES)


def test_unknown_stage_exits_non_zero_and_lists_the_stages():
    result = run_cli("stage=no_such_stage")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "no_such_stage" in output
    for name in stages.STAGES:
        assert name in output
    assert "Traceback" not in output


def test_missing_stage_asks_for_one():
    result = run_cli()
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "stage" in output and "synthesize" in output
    assert "Traceback" not in output


def test_bad_override_gives_hydras_error_not_a_stage_traceback():
    result = run_cli("stage=synthesize", "data.num_samplez=10")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "num_samplez" in output and "Could not override" in output
    assert "Traceback" not in output
    assert "pipelines/stages" not in output


def test_stage_load_rejects_unknown_names_with_the_list():
    try:
        stages.load("nope")
    except stages.UnknownStageError as error:
        assert "synthesize" in str(error)
    else:
        raise AssertionError("an unknown stage loaded")
