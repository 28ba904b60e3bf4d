"""stage=synthesize: a seeded LAION-400M-format corpus (metadata + img2dataset shards) in ``data.raw_url``.

Rows are planned on the driver; each img2dataset shard is rendered, JPEG-encoded and written by one Ray Data
task. The metadata parquet and the truth table (each row's scene and injected defect) follow, and the manifest
is written last.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from functools import partial
from itertools import groupby
from typing import Any

import mlflow
import pyarrow.parquet as pq
import ray
from omegaconf import DictConfig

from ldm.manifest import write_manifest
from ldm.storage import Storage, resolve
from ldm.synthetic.corpus import (
    GENERATOR_VERSION,
    IMG2DATASET_META_SCHEMA,
    IMG2DATASET_PARQUET_SCHEMA,
    LAION_SCHEMA,
    img2dataset_shard,
    laion_metadata_table,
    plan_rows,
    truth_table,
)
from ldm.synthetic.scene import held_out_combinations
from pipelines.cluster import connect
from pipelines.outputs import claim_or_skip, require_reachable_storage, stage_fingerprint
from pipelines.tracking import stage_run

STAGE = "synthesize"


def run(cfg: DictConfig) -> dict[str, Any]:
    storage = Storage.from_config(cfg.storage)
    data, settings = cfg.data, cfg.stage
    out = resolve(data.raw_url)
    require_reachable_storage(cfg, storage.is_local(out))
    identity = stage_fingerprint(cfg, GENERATOR_VERSION)
    with stage_run(cfg, STAGE):
        done = claim_or_skip(cfg, storage, out, STAGE, identity, detail="{rows} rows")
        if done is not None:
            return done

        started = time.time()
        rows = plan_rows(
            num_samples=data.num_samples,
            resolution=data.resolution,
            seed=data.seed,
            bad_rows=data.bad_rows,
            holdout_fraction=data.holdout_fraction,
            rows_per_shard=settings.rows_per_shard,
        )
        connect(cfg.cluster)
        shards = [
            {"shard": shard, "rows": json.dumps(list(group))}
            for shard, group in groupby(rows, key=lambda r: r["shard"])
        ]
        write = partial(
            _write_shard, storage=storage, url=out, jpeg_quality=settings.jpeg_quality, formats=list(settings.formats)
        )
        written = (
            ray.data.from_items(shards, override_num_blocks=len(shards))
            .map(write, num_cpus=settings.resources.num_cpus_per_task)
            .take_all()
        )
        _write_table(storage, out, "metadata", laion_metadata_table(rows), settings.metadata_rows_per_file)
        _write_table(storage, out, "_truth.parquet", truth_table(rows))
        elapsed = time.time() - started

        images = sum(w["images"] for w in written)
        bad = Counter(r["defect"] for r in rows if r["defect"])
        counts = {"rows": len(rows), "images": images, "shards": len(shards), "bad_rows": dict(sorted(bad.items()))}
        manifest = write_manifest(
            storage,
            out,
            stage=STAGE,
            fingerprint=identity,
            expected_files={name: size for w in written for name, size in json.loads(w["files"]).items()},
            inputs={},
            counts=counts,
            timings={"seconds": round(elapsed, 3)},
            facts={
                "resolution": data.resolution,
                "seed": data.seed,
                "formats": list(settings.formats),
                "layout": {
                    "metadata": "metadata/",
                    "webdataset": "webdataset/" if "webdataset" in settings.formats else None,
                    "parquet": "parquet/" if "parquet" in settings.formats else None,
                    "truth": "_truth.parquet",
                },
                "held_out": sorted(held_out_combinations(data.holdout_fraction, data.seed)),
            },
            schema={
                "metadata": _schema(LAION_SCHEMA),
                "img2dataset_meta": _schema(IMG2DATASET_META_SCHEMA),
                "img2dataset_parquet": _schema(IMG2DATASET_PARQUET_SCHEMA),
            },
        )
        mlflow.log_metrics(
            {
                "rows": len(rows),
                "images": images,
                "shards": len(shards),
                "seconds": elapsed,
                "images_per_s": images / max(elapsed, 1e-9),
                **{f"bad_rows.{d}": n for d, n in bad.items()},
            }
        )
        mlflow.log_dict(manifest, "manifest.json")
        print(
            f"{STAGE}: wrote {len(rows)} rows ({images} images, {sum(bad.values())} bad rows, {len(shards)} shards) "
            f"to {out} in {elapsed:.1f}s"
        )
        return manifest


def _write_shard(item: dict[str, Any], *, storage: Storage, url: str, jpeg_quality: int, formats: list[str]):
    """Ray Data task: render, encode and write one img2dataset shard in every configured format."""
    rows = json.loads(item["rows"])
    fs, root = storage.fsspec(url)
    files = img2dataset_shard(rows, jpeg_quality, formats)
    for name, payload in files.items():
        path = f"{root}/{name}"
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, payload)
    images = sum(1 for r in rows if r["defect"] != "failed_download")
    return {"shard": item["shard"], "images": images, "files": json.dumps({n: len(p) for n, p in files.items()})}


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
