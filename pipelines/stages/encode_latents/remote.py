"""The CPU tasks stage=encode_latents runs on Ray around the encoder actors (``encoder``): read and decode, write.

They import neither torch nor diffusers: Ray starts a worker process per task slot, and diffusers' import
alone costs ~7 s of CPU in each, which on a small machine is time taken from the encoder.

Every row carries the prepared file it came from (``path``) all the way to the writer, which writes one part
per source file in its batch under a name fixed by the rows it holds (a retried task overwrites, never adds)
and reports what it wrote; the driver marks a source file done once every one of its rows is accounted for.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ldm.data.images import resize, square_crop
from ldm.data.layouts import parse_layout
from ldm.data.masks import random_mask
from ldm.latents import CONCAT_COLUMNS, LOW_RES, MASK, TEXT_EMBEDDING, LatentStats, column_array, tensor_column
from ldm.storage import Storage

# Prepared columns that go on to train_ldm: the caption's, and the class and layout (null when the data has none).
CARRIED = ("key", "caption", "input_ids", "attention_mask", "label", "boxes")
SHARDS = "shards"
HELD_OUT = "held_out"  # prepare's folder of held-out rows, and this stage's for their latents


def folder(path: str) -> str:
    """Where a prepared file's latents go: held-out rows stay apart from the training shards."""
    return HELD_OUT if os.path.basename(os.path.dirname(path)) == HELD_OUT else SHARDS


def stem(path: str) -> str:
    """A prepared file's name without suffix (prefixed by its folder when held out: prepare names the files of
    both folders alike): its output parts start with it."""
    name = os.path.basename(path).removesuffix(".parquet")
    return f"{HELD_OUT}-{name}" if folder(path) == HELD_OUT else name


def row_groups(rows: int, row_group_rows: int) -> list[int]:
    """The rows of each row group ``write`` makes of a part of ``rows`` rows."""
    return [min(row_group_rows, rows - start) for start in range(0, rows, row_group_rows)]


def decode(
    batch: pa.Table,
    *,
    storage: Storage,
    resolution: int,
    batch_rows: int,
    concat: str | None = None,
    latent_side: int = 0,
) -> Iterator[pa.Table]:
    """The prepared files named in ``batch["path"]``, read ``batch_rows`` rows at a time (a file is never whole in
    memory), as ``crops`` with each row's file. Read here, not with ``read_parquet``: prepare's manifest already
    gives the files and their rows, and Ray Data's footer reading starts a task process per few files, which
    made the stage's peak memory grow with the number of files."""
    for path in batch["path"].to_pylist():
        fs, local = storage.pyarrow(path)
        with fs.open_input_file(local) as f:
            for rows in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=[*CARRIED, "image"]):
                table = crops(
                    pa.Table.from_batches([rows]), resolution=resolution, concat=concat, latent_side=latent_side
                )
                yield table.append_column("path", pa.array([path] * len(table), pa.string()))


def crops(batch: pa.Table, *, resolution: int, concat: str | None = None, latent_side: int = 0) -> pa.Table:
    """Center crops as uint8 tensors; a row whose image does not decode keeps zeros and its reason. With the
    task's ``concat``, what its UNet input needs from the pixels beside them: the crop downsampled to the
    latent's ``latent_side`` (``low_res``), or a random mask fixed by the row's key (``mask``, 1 in the hole;
    the encoder turns it into the masked image's latent)."""
    pixels, reasons = [], []
    for data in batch["image"].to_pylist():
        try:
            pixels.append(square_crop(data, resolution))
            reasons.append(None)
        except Exception:  # PIL raises many kinds on bad bytes; the row is dropped and counted, never fatal
            pixels.append(np.zeros((resolution, resolution, 3), np.uint8))
            reasons.append("undecodable")
    array = np.stack(pixels) if pixels else np.zeros((0, resolution, resolution, 3), np.uint8)
    batch = (
        batch.drop_columns(["image"])
        .append_column("pixels", tensor_column(array))
        .append_column("reason", pa.array(reasons, pa.string()))
    )
    if concat == "low_res":
        batch = batch.append_column(LOW_RES, tensor_column(resize(array, latent_side)))
    elif concat == "masked":
        masks = [random_mask(resolution, key) for key in batch["key"].to_pylist()]
        batch = batch.append_column(
            MASK, tensor_column(np.stack(masks) if masks else np.zeros((0, resolution, resolution), np.uint8))
        )
    return batch


def write(batch: pa.Table, *, storage: Storage, out: str, compression: str, row_group_rows: int) -> pa.Table:
    """One part per source file in the batch, in row groups of ``row_group_rows`` (the last one shorter); a row
    per part saying what was written and dropped."""
    fs, root = storage.fsspec(out)
    reports = []
    for source in pc.unique(batch["path"]).to_pylist():
        rows = batch.filter(pc.equal(batch["path"], source))
        kept = rows.filter(pc.is_null(rows["reason"]))
        name, size, stats, classes, laid_out = None, 0, LatentStats(), [], 0
        if len(kept):
            table = kept.select(
                [
                    *CARRIED,
                    *(c for c in kept.column_names if c.startswith("latent") or c in (TEXT_EMBEDDING, *CONCAT_COLUMNS)),
                ]
            )
            keys = table["key"]
            tag = hashlib.sha1(f"{keys[0]}|{keys[-1]}|{len(table)}".encode()).hexdigest()[:12]
            name = f"{stem(source)}-{tag}.parquet"
            name = f"{folder(source)}/{name}"
            fs.makedirs(f"{root}/{folder(source)}", exist_ok=True)
            with fs.open(f"{root}/{name}", "wb") as f:
                pq.write_table(table, f, compression=compression, row_group_size=row_group_rows)
            size = int(fs.size(f"{root}/{name}"))
            stats = LatentStats.of({c: column_array(table[c]) for c in table.column_names if c.startswith("latent")})
            classes, laid_out = classes_of(table, source)
        reports.append(
            {
                "source": source,
                "file": name,
                "size": size,
                "rows": len(kept),
                "undecodable": len(rows) - len(kept),
                "count": stats.count,
                "sum": stats.sum,
                "sum_sq": stats.sum_sq,
                "sum_var": stats.sum_var,
                "classes": classes,
                "laid_out": laid_out,
            }
        )
    return pa.Table.from_pylist(reports, schema=REPORT_SCHEMA)


def classes_of(table: pa.Table, source: str) -> tuple[list[str], int]:
    """The distinct classes a part's rows name, as labels or in their boxes (a class vocabulary is their union
    over the data, so no class seen in training lacks an index; bounded by the number of classes, not rows), and
    how many rows have a layout of at least one box. Every layout is checked here, where it is read."""
    names = {label for label in pc.unique(table["label"]).to_pylist() if label is not None}
    laid_out = 0
    for boxes in table["boxes"].to_pylist():
        try:
            layout = parse_layout(boxes)
        except ValueError as e:
            raise ValueError(f"{source}: the boxes column (data.input.boxes_col): {e}") from None
        names.update(box["label"] for box in layout)
        laid_out += bool(layout)
    return sorted(names), laid_out


REPORT_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("file", pa.string()),
        ("size", pa.int64()),
        ("rows", pa.int64()),
        ("undecodable", pa.int64()),
        ("count", pa.int64()),
        ("sum", pa.list_(pa.float64())),
        ("sum_sq", pa.list_(pa.float64())),
        ("sum_var", pa.list_(pa.float64())),
        ("classes", pa.list_(pa.string())),
        ("laid_out", pa.int64()),  # rows with a layout of at least one box
    ]
)
