"""Logging to the MLflow run the driver opened for a stage, from any Ray worker process.

MLflow's client is imported when a worker first logs, not when this module loads: the ranks and Ray Data tasks that
never log do not pay for its import, and no worker imports the driver's tracking module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class RunTarget:
    """The driver's MLflow run for the stage, spelled so that any worker process can reach it."""

    tracking_uri: str
    run_id: str


class RunLogger:
    """A client bound to one run: workers do not share the driver's active-run state."""

    def __init__(self, target: RunTarget):
        import mlflow  # here, not at the top: see the module's docstring

        self.client = mlflow.MlflowClient(tracking_uri=target.tracking_uri)
        self.entities = mlflow.entities
        self.run_id = target.run_id

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        logged = [self.entities.Metric(k, float(v), now, step) for k, v in metrics.items() if k != "step"]
        self.client.log_batch(self.run_id, metrics=logged)

    def params(self, params: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=[self.entities.Param(k, str(v)) for k, v in params.items()])

    def image(self, image: Image.Image, key: str, step: int) -> None:
        """An image in the series ``key``: the UI's Images tab steps through a series by training step."""
        self.client.log_image(self.run_id, image, key=key, step=step)

    def text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)
