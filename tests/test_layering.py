"""The layers hold: ``ldm/`` imports no Ray, Hydra, OmegaConf or MLflow, and the modules Ray worker processes
import load without MLflow, Hydra, OmegaConf or the driver's modules."""

import ast
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from pipelines import stages

LIBRARY_FORBIDDEN = {"ray", "hydra", "omegaconf", "mlflow"}
# What a worker process must not load: the tracking and config libraries, and the driver side of pipelines/.
WORKER_FORBIDDEN = [
    "mlflow",
    "hydra",
    "omegaconf",
    "pipelines.driver",  # the package: loaded whenever any of its modules is
    *(f"pipelines.stages.{name}.stage" for name in stages.STAGES),
]
# The export's pyfunc model is loaded by MLflow, not by a Ray worker: importing mlflow is its job. evaluate runs
# in the driver, and so do its metric families.
NOT_RAY_SIDE = {"pyfunc_model", "metrics"}


def imported(path) -> set[str]:
    """Top-level package of every import in a file, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def worker_modules() -> list[str]:
    """Every module of a stage package but its ``stage`` (the driver), and the shared worker-side ones."""
    found = [
        "pipelines.schema",
        *(f"pipelines.worker.{p.stem}" for p in sorted((ROOT / "pipelines" / "worker").glob("[!_]*.py"))),
    ]
    for name in stages.STAGES:
        for path in sorted((ROOT / "pipelines" / "stages" / name).glob("*.py")):
            if path.stem not in {"__init__", "stage", *NOT_RAY_SIDE}:
                found.append(f"pipelines.stages.{name}.{path.stem}")
    return found


def loaded_by(module: str, watch: list[str]) -> list[str]:
    """Which of ``watch`` a fresh interpreter has loaded after importing ``module``."""
    probe = f"import sys, json, {module}; print(json.dumps(sorted(m for m in {watch!r} if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_library_imports_no_ray_hydra_omegaconf_or_mlflow():
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported(path) & LIBRARY_FORBIDDEN) for path in (ROOT / "ldm").rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_every_stage_package_has_worker_side_modules_to_check():
    modules = worker_modules()
    for name in ("synthesize", "prepare", "train_autoencoder", "encode_latents", "train_ldm"):
        assert any(m.startswith(f"pipelines.stages.{name}.") for m in modules), name


@pytest.mark.parametrize("module", worker_modules())
def test_a_worker_side_module_loads_without_mlflow_hydra_or_the_driver(module):
    assert loaded_by(module, WORKER_FORBIDDEN) == []


def test_the_decode_and_write_tasks_load_without_torch_or_diffusers():
    """Ray starts a worker process per task slot; importing diffusers in each costs seconds of the encoder's CPU."""
    assert loaded_by("pipelines.stages.encode_latents.remote", ["torch", "diffusers"]) == []
