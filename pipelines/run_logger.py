"""Logging from Ray Train workers to the MLflow run that the driver opened for the stage."""

from __future__ import annotations

import time
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from PIL import Image


class RunLogger:
    """A client bound to one run: workers do not share the driver's active-run state."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if k != "step"])

    def params(self, params: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def image(self, image: Image.Image, path: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=path)

    def text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)
