"""infra/: every manifest parses, every job runs a real stage with a config Hydra composes, and the images,
versions and names the files share agree with each other and with pyproject.toml."""

import re
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit

import tomllib
import yaml
from conftest import ROOT
from mlflow.server.security_utils import is_allowed_host_header
from omegaconf import OmegaConf

from pipelines import stages
from pipelines.driver.config import compose

INFRA = ROOT / "infra"
ENTRYPOINT = ["python", "/app/pipelines/run.py"]
TRACKING_URI = "http://mlflow.ldm.svc:5000"  # the tracking server's Service (infra/mlflow/mlflow.yaml)


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def pinned(package: str) -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [pin] = [d.split("==")[1] for d in dependencies if re.match(rf"{package}(\[.*\])?==", d)]
    return pin


def kubernetes(kind: str) -> list[dict]:
    return [d for path in sorted((INFRA / "kuberay").glob("*.yaml")) for d in documents(path) if d["kind"] == kind]


def containers(spec: dict) -> list[dict]:
    return spec["template"]["spec"]["containers"]


def test_every_manifest_parses_and_names_its_kind():
    manifests = sorted(INFRA.rglob("*.yaml"))
    assert {p.relative_to(INFRA).parts[0] for p in manifests} == {"kuberay", "aws", "mlflow"}
    for path in manifests:
        for document in documents(path):
            assert isinstance(document, dict), path
            if path.parent.name != "aws":
                assert document.get("apiVersion") and document.get("kind"), f"{path}: not a Kubernetes object"


def test_each_rayjob_runs_a_stage_with_a_config_that_composes_and_resolves(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", TRACKING_URI)
    [cluster] = kubernetes("RayCluster")
    jobs = {}
    for job in kubernetes("RayJob"):
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        command = shlex.split(job["spec"]["entrypoint"])
        assert command[:2] == ENTRYPOINT and (ROOT / "pipelines" / "run.py").exists()
        overrides = command[2:]
        [stage] = [o.split("=", 1)[1] for o in overrides if o.startswith("stage=")]
        assert stage in stages.STAGES, f"{job['metadata']['name']}: no stage {stage!r}"
        cfg = compose(*overrides)  # an unknown group, option or key fails here
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # and a missing value here
        assert cfg.cluster.address == "auto" and cfg.storage.root.startswith("s3://")
        jobs[stage] = cfg

    assert {"prepare", "encode_latents", "train_ldm"} <= set(jobs)
    assert jobs["encode_latents"].stage.resources.num_gpus_per_encoder >= 1
    assert jobs["train_ldm"].stage.scaling.use_gpu
    # The label selectors name labels the cluster's groups set, on the kind of group they mean.
    groups = {tuple(g["labels"].items())[0]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpus = lambda group: "nvidia.com/gpu" in containers(group)[0]["resources"]["limits"]  # noqa: E731
    resources = jobs["encode_latents"].stage.resources
    assert gpus(groups[tuple(resources.encoder_label_selector.items())[0]])
    assert not gpus(groups[tuple(resources.decode_label_selector.items())[0]])


def test_the_cluster_runs_one_image_built_from_this_project_on_this_ray():
    [cluster] = kubernetes("RayCluster")
    assert cluster["spec"]["rayVersion"] == pinned("ray") == version("ray")
    pods = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    images = {c["image"] for pod in pods for c in containers(pod)}
    aws = documents(INFRA / "aws" / "cluster.yaml")[0]
    assert len(images) == 1 and aws["docker"]["image"] in images

    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    cuda = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-\S+", dockerfile, re.M)
    assert cuda and f"ARG TORCH_CUDA=cu{cuda[1]}{cuda[2]}\n" in dockerfile  # torch's CUDA build is the image's CUDA
    assert f"ARG TORCH_VERSION={pinned('torch')}\n" in dockerfile
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for directory in [p.rstrip("*") for p in packages] + ["conf"]:
        assert f"COPY {directory} {directory}\n" in dockerfile


def test_the_aws_cluster_has_a_cpu_and_a_gpu_worker_type_that_start_ray():
    aws = documents(INFRA / "aws" / "cluster.yaml")[0]
    assert aws["provider"]["type"] == "aws" and aws["head_node_type"] in aws["available_node_types"]
    workers = {name: t for name, t in aws["available_node_types"].items() if name != aws["head_node_type"]}
    instance = lambda t: t["node_config"]["InstanceType"]  # noqa: E731
    # Each worker type carries the node label the RayJobs select on, matching its hardware.
    kinds = {t["labels"]["node-kind"]: instance(t) for t in workers.values()}
    assert kinds["gpu"].startswith(("g", "p")) and kinds["cpu"].startswith(("c", "m", "r"))
    encode = next(j for j in kubernetes("RayJob") if "stage=encode_latents" in j["spec"]["entrypoint"])
    assert "{node-kind:gpu}" in encode["spec"]["entrypoint"] and "{node-kind:cpu}" in encode["spec"]["entrypoint"]
    assert any("ray start --head" in c for c in aws["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in aws["worker_start_ray_commands"])


def test_the_mlflow_server_uses_postgresql_and_s3_with_flags_this_mlflow_has():
    dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert f"ARG MLFLOW_VERSION={pinned('mlflow')}\n" in dockerfile and "psycopg2" in dockerfile
    [server] = [d for d in documents(INFRA / "mlflow" / "mlflow.yaml") if d["kind"] == "Deployment"]
    [container] = server["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow", "server"]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in container["args"])
    assert flags["backend-store-uri"].startswith("postgresql://") and flags["artifacts-destination"].startswith("s3://")
    help_text = subprocess.run(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in flags:
        assert f"--{flag}" in help_text, f"mlflow server has no --{flag}"
    # The server answers only Host headers it allows, port included: the stages' URI must be one of them.
    assert is_allowed_host_header(flags["allowed-hosts"].split(","), urlsplit(TRACKING_URI).netloc)
    services = {d["metadata"]["name"] for d in documents(INFRA / "mlflow" / "mlflow.yaml") if d["kind"] == "Service"}
    assert {"mlflow", "mlflow-db"} <= services


SECRET = r"(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|POSTGRES_PASSWORD|RAY_AUTH_TOKEN)"


def test_no_infra_file_holds_a_secret():
    files = sorted(p for p in INFRA.rglob("*") if p.is_file())
    assert len(files) >= 8
    for path in files:
        text = path.read_text()
        assert not re.search(rf"{SECRET}\s*[:=]\s*(?!\.\.\.)\S", text), f"{path}: a secret's value"
        assert not re.search(rf"name:\s*{SECRET}\s*,\s*value:", text), f"{path}: a secret as a literal env value"
