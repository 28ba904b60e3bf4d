"""Every stage invocation is an MLflow run named after the stage.

The resolved config is logged as flattened params and as a YAML artifact, with anything that looks like a
secret masked (the config should never hold one: credentials come from the environment; this is the belt to
that pair of braces). A run started while another is active is nested under it, which is how chained stages
appear under their parent pipeline run.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import mlflow
import yaml
from omegaconf import DictConfig

from pipelines.driver.config import plain

# Matched against whole parts of a key ("hf_token", "aws_secret_access_key"), so "tokenizer" or "max_tokens"
# stay visible.
SECRET_KEY = re.compile(
    r"(^|[_.-])(secret|password|passwd|pwd|passphrase|token|credentials?|private|auth|sas|apikey|api_key|"
    r"access_key|session_key)($|[_.-])",
    re.I,
)
URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
MASK = "***"

# MLflow 3's UI opens an experiment without this tag as a GenAI one (traces, prompts); these are training runs.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# `mlflow ui` otherwise starts job-consumer processes (GenAI jobs this project never submits) that take CPU.
UI_ENVIRONMENT = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false"


def redact(value: Any) -> Any:
    """A copy of a config tree with secrets masked: values of secret-looking keys, ``{name: <secret-looking>,
    value: ...}`` pairs (environment variable lists), and ``user:password@`` in URLs."""
    if isinstance(value, Mapping):
        secret_pair = SECRET_KEY.search(str(value.get("name", "")))
        return {
            k: MASK if v is not None and (SECRET_KEY.search(str(k)) or (secret_pair and k == "value")) else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return URL_USERINFO.sub(f"{MASK}@", value)
    return value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay whole as their string form."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@contextmanager
def stage_run(cfg: DictConfig, stage: str) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one stage invocation, nested under the active run if there is one."""
    mlflow.set_tracking_uri(cfg.tracking.uri)
    parent = mlflow.active_run()
    if parent is None:
        experiment = mlflow.set_experiment(cfg.tracking.experiment)
        if EXPERIMENT_KIND not in experiment.tags:
            mlflow.set_experiment_tag(EXPERIMENT_KIND, MODEL_TRAINING)
    config = redact(plain(cfg))
    with mlflow.start_run(run_name=stage, nested=parent is not None, tags={"stage": stage}) as run:
        mlflow.log_params(flatten(config))
        mlflow.log_text(yaml.safe_dump(config, sort_keys=False), "config.yaml")
        yield run
    if parent is None:
        print(
            f"MLflow: run {run.info.run_id} ({stage}) in experiment {cfg.tracking.experiment!r} at "
            f"{redact(cfg.tracking.uri)}"
        )
        if cfg.tracking.uri.startswith(("http://", "https://")):
            print(
                f"        open {redact(cfg.tracking.uri).rstrip('/')}/#/experiments/{run.info.experiment_id}"
                f"/runs/{run.info.run_id}"
            )
        if cfg.tracking.uri.startswith("sqlite:///"):
            database = os.path.abspath(cfg.tracking.uri.removeprefix("sqlite:///"))
            mlflow_cli = os.path.join(os.path.dirname(sys.executable), "mlflow")
            print(
                f"        open the UI with: {UI_ENVIRONMENT} {mlflow_cli} ui --backend-store-uri sqlite:///{database}"
                " (then http://127.0.0.1:5000)"
            )
