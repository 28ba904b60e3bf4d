"""The rows evaluation reads, found from a latents output through its manifest chain: prepare's held-out rows
(never trained on, by the first stage or the diffusion model), which metrics measure on and the
image-conditioned tasks sample from (their low-resolution or masked versions); and the training rows'
captions, whose scenes are the training data's distribution."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ldm.data.images import square_crop
from ldm.manifest import data_files, verify
from ldm.storage import Storage

COLUMNS = ("key", "caption", "label", "boxes", "image")


def held_out_rows(storage: Storage, latents_url: str, limit: int) -> tuple[dict[str, list], dict[str, Any]]:
    """Key, caption, label, boxes and image bytes of the first ``limit`` of prepare's held-out rows (found
    through encode_latents -> prepare; read a batch at a time, never a whole file), and how they were chosen
    (prepare's ``held_out`` fact)."""
    rows: dict[str, list] = {name: [] for name in COLUMNS}
    latents = verify(storage, latents_url, stage="encode_latents")
    prepared_url = latents["inputs"]["prepared"]
    prepared = verify(storage, prepared_url, stage="prepare")
    split = prepared["facts"].get("held_out") or {"fraction": 0.0, "rows": 0}
    if limit <= 0:
        return rows, split
    for shard in data_files(prepared, prepared_url, "held_out"):
        fs, path = storage.pyarrow(shard)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=list(rows)):
                for name in rows:
                    rows[name] += batch[name].to_pylist()[: limit - len(rows[name])]
                if len(rows["key"]) >= limit:
                    return rows, split
    return rows, split


def crops(images: list[bytes], side: int) -> np.ndarray:
    """Encoded images as N x side x side x 3 uint8 center crops, as encode_latents crops them."""
    return np.stack([square_crop(data, side) for data in images]) if images else np.zeros((0, side, side, 3), np.uint8)


def held_out_crops(storage: Storage, latents_url: str, count: int, side: int) -> tuple[list[str], np.ndarray]:
    """Keys and crops of the first ``count`` held-out rows."""
    rows, _ = held_out_rows(storage, latents_url, count)
    return rows["key"], crops(rows["image"], side)


def training_captions(storage: Storage, latents_url: str, limit: int) -> list[str]:
    """The captions of the first ``limit`` training rows of a latents output (the caption column alone, a
    batch at a time)."""
    latents = verify(storage, latents_url, stage="encode_latents")
    captions: list[str] = []
    for shard in data_files(latents, latents_url):
        fs, path = storage.pyarrow(shard)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=["caption"]):
                captions += batch["caption"].to_pylist()[: limit - len(captions)]
                if len(captions) >= limit:
                    return captions
    return captions
