"""The MLflow pyfunc model stage=export logs (MLflow "models from code": this file travels with the model).

It needs diffusers, transformers and torch, not this project: the artifact ``pipeline`` is a plain
diffusers ``LDMTextToImagePipeline`` directory. ``predict`` takes a DataFrame with a ``prompt`` column and,
optionally, ``seed``, ``steps`` and ``guidance_scale`` columns, and returns one PNG per row. It runs on the
serving machine's GPU when there is one (``model_config={"device": ...}`` chooses).
"""

from __future__ import annotations

import io

import mlflow
import pandas as pd
import torch
from diffusers import DiffusionPipeline


def serving_device(model_config: dict | None) -> str:
    """The ``device`` of the model's config (``mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})``),
    ``auto`` by default: the server's GPU when it has one."""
    device = (model_config or {}).get("device", "auto")
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


class TextToImage(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        # Seeds draw their noise on the CPU (predict's generators), so an image is the same on any device.
        self.pipeline = DiffusionPipeline.from_pretrained(context.artifacts["pipeline"]).to(
            serving_device(context.model_config)
        )
        self.pipeline.set_progress_bar_config(disable=True)
        # The pipeline sizes latents as height // 8 whatever the first stage's factor.
        self.size = 8 * self.pipeline.unet.config.sample_size

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        rows = []
        for i, row in enumerate(model_input.to_dict("records")):
            seed = int(_value(row, "seed", i))
            output = self.pipeline(
                [str(row["prompt"])],
                height=self.size,
                width=self.size,
                num_inference_steps=int(_value(row, "steps", 50)),
                guidance_scale=float(_value(row, "guidance_scale", 4.0)),
                generator=torch.Generator().manual_seed(seed),
            )
            buffer = io.BytesIO()
            output.images[0].save(buffer, format="PNG")
            rows.append({"prompt": row["prompt"], "seed": seed, "png": buffer.getvalue()})
        return pd.DataFrame(rows)


def _value(row: dict, column: str, default):
    value = row.get(column)
    return default if value is None or pd.isna(value) else value


mlflow.models.set_model(TextToImage())
