"""stage=download: fetch the images of the metadata rows stage=prepare kept, into ``data.images_url`` in
img2dataset's layout, one Ray task per shard around img2dataset's downloader.

Not img2dataset's own ``download(distributor="ray")``: it reads each input file whole in the driver, starts
every shard's task at once, and retries nothing (its ``max_shard_retry`` is ignored by that distributor). Here
shards are planned from the parquet footers, run as a Ray Data map (as many at once as the CPUs given to them
allow, with a progress bar), and a shard is done when img2dataset has written its ``_stats.json``: a re-run
(the same command after a kill) downloads only the shards without one, from their start.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import partial
from typing import Any

import pyarrow.parquet as pq
import ray
from omegaconf import DictConfig

from ldm.data.download import STATS, carried_columns, plan_shards, shard_name
from ldm.data.sources import Columns
from ldm.manifest import IncompleteOutputError, data_files
from ldm.storage import Storage
from pipelines.driver.cluster import Request
from pipelines.driver.config import plain
from pipelines.driver.stage import Inputs, Job, Output, Stage
from pipelines.stages.download import remote

# Bump when download's output changes for the same config and input.
DOWNLOAD_VERSION = 1
STAGE = Stage(
    "download",
    version=DOWNLOAD_VERSION,
    output_url=lambda cfg: cfg.data.images_url,
    resume=True,
    detail="{success} of {rows} images",
    requests=lambda cfg: [Request("stage.resources.num_cpus_per_task", {"CPU": cfg.stage.resources.num_cpus_per_task})],
)


def run(cfg: DictConfig) -> dict[str, Any]:
    return STAGE.run(cfg, _inputs, _download)


def _inputs(cfg: DictConfig, storage: Storage) -> Inputs:
    """prepare's output for metadata (a list of URLs), not for images."""
    inputs = Inputs.output_of("prepare", cfg.data.prepared_url, storage, "metadata")
    manifest = inputs.found["metadata"]
    if manifest["facts"].get("format") != "metadata":
        raise ValueError(
            f"data.prepared_url={inputs.record['metadata']} holds prepared images, not filtered metadata: "
            f"stage=download takes the output of stage=prepare on a metadata input (data.input.format=metadata)"
        )
    return inputs


def _download(job: Job) -> Output:
    cfg, storage, out, settings = job.cfg, job.storage, job.out, job.settings
    manifest, source = job.inputs.found["metadata"], job.inputs.record["metadata"]
    columns = Columns.from_config(plain(cfg.data.input))
    carried = carried_columns(columns, plain(cfg.data.input.extra_columns))
    files = []
    for url in data_files(manifest, source):
        fs, path = storage.fsspec(url)
        with fs.open(path, "rb") as f:
            files.append((url, pq.ParquetFile(f).metadata.num_rows))
    shards = plan_shards(files, settings.number_sample_per_shard)
    names = [shard_name(s.index, len(shards)) for s in shards]
    fs, root = storage.fsspec(out)
    fs.makedirs(root, exist_ok=True)
    done = len(fs.glob(f"{root}/*{STATS}"))
    rows = sum(s.rows for s in shards)
    print(
        f"download: {rows} URLs in {len(shards)} shard(s) of {settings.number_sample_per_shard} from {source} -> {out}"
        + (f"; resuming: {done} shard(s) already downloaded" if done else "")
    )
    # Every shard goes to the cluster: a finished one is only read back there (and checked), not downloaded.
    task = partial(
        remote.download,
        job={"storage": storage, "out": out, "columns": columns, "carried": carried, "options": plain(settings)},
    )
    items = [{"index": s.index, "name": n, "pieces": json.dumps(s.pieces)} for s, n in zip(shards, names)]
    results = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map(task, num_cpus=settings.resources.num_cpus_per_task, concurrency=settings.resources.max_shards_at_once)
        .take_all()
    )
    outcomes: Counter[str] = Counter()
    for result in results:
        outcomes.update(json.loads(result["outcomes"]))
    if sum(outcomes.values()) != rows:
        raise IncompleteOutputError(
            f"download: {rows} URLs planned, {sum(outcomes.values())} accounted for in {out}; re-run to resume"
        )
    _report(rows, outcomes)
    fmt = settings.output_format
    ours = set(names)
    written = {
        path.rsplit("/", 1)[-1]: int(info["size"])
        for path, info in fs.find(root, detail=True).items()
        if path.rsplit("/", 1)[-1].split(".")[0].removesuffix("_stats") in ours
    }
    failures = {kind: n for kind, n in sorted(outcomes.items()) if kind != "success"}
    return Output(
        counts={"rows": rows, "shards": len(shards), "success": outcomes["success"], "failed": failures},
        facts={
            "format": fmt,
            "layout": {fmt: "./"},
            "carried_columns": carried,
            "encode_format": settings.encode_format,
        },
        expected_files=written,
        metrics={
            "rows": rows,
            "success": outcomes["success"],
            "success_rate": outcomes["success"] / max(rows, 1),
            **{f"failed.{kind}": n for kind, n in failures.items()},
        },
        message=f"download: the images are in {out}: stage=prepare data.input.url={out} data.input.format={fmt} "
        "prepares them (stage=pipeline does it for you)",
    )


def _report(rows: int, outcomes: Counter[str]) -> None:
    width = max(len(k) for k in outcomes)
    lines = [f"download: {outcomes['success']} of {rows} images downloaded ({outcomes['success'] / max(rows, 1):.1%})"]
    lines += [f"  {kind:<{width}} {n:>10}" for kind, n in sorted(outcomes.items(), key=lambda kv: -kv[1])]
    print("\n".join(lines))
