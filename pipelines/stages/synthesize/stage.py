"""stage=synthesize: a seeded LAION-400M-format corpus (metadata + img2dataset shards) in ``data.raw_url``.

Rows are planned on the driver; each img2dataset shard is rendered, JPEG-encoded and written by one Ray Data
task (``remote.py``). The metadata parquet and the truth table (each row's scene and injected defect) follow.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from functools import partial
from itertools import groupby
from typing import Any

import pyarrow.parquet as pq
import ray
from omegaconf import DictConfig

from ldm.storage import Storage
from ldm.synthetic.corpus import (
    GENERATOR_VERSION,
    IMG2DATASET_META_SCHEMA,
    IMG2DATASET_PARQUET_SCHEMA,
    LAION_SCHEMA,
    laion_metadata_table,
    plan_rows,
    truth_table,
)
from ldm.synthetic.scene import held_out_combinations
from pipelines.driver.cluster import Request
from pipelines.driver.config import plain
from pipelines.driver.stage import Inputs, Job, Output, Stage
from pipelines.stages.synthesize.remote import write_shard
from pipelines.worker.console import ProgressLine

STAGE = Stage(
    "synthesize",
    version=GENERATOR_VERSION,
    output_url=lambda cfg: cfg.data.raw_url,
    detail="{rows} rows",
    requests=lambda cfg: [Request("stage.resources.num_cpus_per_task", {"CPU": cfg.stage.resources.num_cpus_per_task})],
)


def run(cfg: DictConfig) -> dict[str, Any]:
    return STAGE.run(cfg, lambda cfg, storage: Inputs(), _synthesize)


def _synthesize(job: Job) -> Output:
    data, settings, storage, out = job.cfg.data, job.settings, job.storage, job.out
    formats = plain(settings.formats)
    started = time.time()
    rows = plan_rows(
        num_samples=data.num_samples,
        resolution=data.resolution,
        seed=data.seed,
        bad_rows=plain(data.bad_rows),
        holdout_fraction=data.holdout_fraction,
        image_host=data.image_host,
        rows_per_shard=settings.rows_per_shard,
    )
    shards = [
        {"shard": shard, "rows": json.dumps(list(group))} for shard, group in groupby(rows, key=lambda r: r["shard"])
    ]
    write = partial(write_shard, storage=storage, url=out, jpeg_quality=settings.jpeg_quality, formats=formats)
    rows_written = (
        ray.data.from_items(shards, override_num_blocks=len(shards))
        .map(write, num_cpus=settings.resources.num_cpus_per_task)
        .iter_rows()
    )
    written, progress = [], ProgressLine(STAGE.name, len(shards), unit="shard")
    for shard in rows_written:
        written.append(shard)
        progress.update(len(written))
    _write_table(storage, out, "metadata", laion_metadata_table(rows), settings.metadata_rows_per_file)
    _write_table(storage, out, "_truth.parquet", truth_table(rows))

    elapsed = time.time() - started
    images = sum(w["images"] for w in written)
    bad = Counter(r["defect"] for r in rows if r["defect"])
    return Output(
        counts={"rows": len(rows), "images": images, "shards": len(shards), "bad_rows": dict(sorted(bad.items()))},
        expected_files={name: size for w in written for name, size in json.loads(w["files"]).items()},
        facts={
            "resolution": data.resolution,
            "seed": data.seed,
            "formats": formats,
            "layout": {
                "metadata": "metadata/",
                "webdataset": "webdataset/" if "webdataset" in formats else None,
                "parquet": "parquet/" if "parquet" in formats else None,
                "truth": "_truth.parquet",
            },
            "held_out": sorted(held_out_combinations(data.holdout_fraction, data.seed)),
        },
        schema={
            "metadata": _schema(LAION_SCHEMA),
            "img2dataset_meta": _schema(IMG2DATASET_META_SCHEMA),
            "img2dataset_parquet": _schema(IMG2DATASET_PARQUET_SCHEMA),
        },
        metrics={
            "rows": len(rows),
            "images": images,
            "shards": len(shards),
            "images_per_s": images / max(elapsed, 1e-9),
            **{f"bad_rows.{d}": n for d, n in bad.items()},
        },
        message=f"synthesize: wrote {len(rows)} rows ({images} images, {sum(bad.values())} bad rows, "
        f"{len(shards)} shards) to {out} in {elapsed:.1f}s",
    )


def _write_table(storage: Storage, url: str, name: str, table, rows_per_file: int | None = None) -> None:
    """One parquet file ``name``, or a folder ``name/`` of ``part-NNNNN.parquet`` files of bounded size."""
    fs, root = storage.pyarrow(url)
    if rows_per_file is None:
        fs.create_dir(root, recursive=True)
        pq.write_table(table, f"{root}/{name}", filesystem=fs)
        return
    fs.create_dir(f"{root}/{name}", recursive=True)
    for part, start in enumerate(range(0, table.num_rows, rows_per_file)):
        pq.write_table(table.slice(start, rows_per_file), f"{root}/{name}/part-{part:05d}.parquet", filesystem=fs)


def _schema(schema) -> dict[str, str]:
    return {field.name: str(field.type) for field in schema}
