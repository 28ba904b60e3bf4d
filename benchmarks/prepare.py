"""stage=prepare throughput against a bare single-process loop over the same rows, measured in one run.

Three inputs: ~100k synthesized LAION metadata rows (the pre-download pass), synthesized img2dataset webdataset
shards (the image pass), and the same tars alone, without img2dataset's parquet (as the hub ships image-text
sets). The bare loop is what any script must do at the least: read the parquet (or the tar's members) with
pyarrow (or tarfile), tokenize the captions with the same tokenizer and, for images, open each one and read its
size. The stage does that plus every filter, global deduplication, bounded writes, drop logs and a manifest, on Ray.

Two comparisons decide how the stage reads:
- tars alone: the project's tar reader against Ray Data's ``read_webdataset``, each as a Ray Data job that
  hands every sample's image bytes and caption to the driver (rows/s);
- the metadata pass on one large file: split into tasks of whole row groups (``stage.rows_per_task``) against
  one task for the file.

    .venv/bin/python benchmarks/prepare.py [--metadata-rows 100000] [--images 8000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm.data.filters import probe_image  # noqa: E402
from ldm.data.sources import Columns, Unit, read_samples  # noqa: E402
from ldm.storage import Storage  # noqa: E402
from ldm.synthetic.corpus import DEFECTS, laion_metadata_table, plan_rows  # noqa: E402
from ldm.text.tokenizer import load_tokenizer, save_tokenizer, tokenize, train_wordpiece  # noqa: E402
from pipelines import stages  # noqa: E402
from pipelines.driver.cluster import connect  # noqa: E402
from pipelines.driver.config import compose as config  # noqa: E402


def bare_metadata(paths: list[str], tokenizer) -> int:
    rows = 0
    for path in paths:
        table = pq.read_table(path, columns=["URL", "TEXT"])
        captions = [" ".join(t.split()) if t else "" for t in table["TEXT"].to_pylist()]
        tokenize(tokenizer, captions, 77)
        rows += len(table)
    return rows


def bare_webdataset(tars: list[str], tokenizer) -> int:
    rows = 0
    for path in tars:
        table = pq.read_table(path[: -len(".tar")] + ".parquet")
        captions = [" ".join(t.split()) if t else "" for t in table["caption"].to_pylist()]
        tokenize(tokenizer, captions, 77)
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    probe_image(tar.extractfile(member).read())
        rows += len(table)
    return rows


def bare_tars(tars: list[str], tokenizer) -> int:
    rows = 0
    for path in tars:
        captions = []
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    captions.append(" ".join(tar.extractfile(member).read().decode().split()))
                elif member.name.endswith(".jpg"):
                    probe_image(tar.extractfile(member).read())
                    rows += 1
        tokenize(tokenizer, captions, 77)
    return rows


def _our_reader(batch: pa.Table, columns: Columns) -> pa.Table:
    storage = Storage(root="/")
    return pa.concat_tables(
        table.select(["_image", columns.caption])
        for unit in batch.to_pylist()
        for table in read_samples(storage, Unit(**unit), "webdataset", columns, 512)
    )


def compare_tar_readers(tars: list[str]) -> None:
    """Rows/s through the driver: the project's reader (one task per tar) against Ray Data's read_webdataset."""
    columns = Columns(url="url", caption="caption", key="key")
    units = [asdict(Unit(i, path, None)) for i, path in enumerate(tars)]
    ours = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        partial(_our_reader, columns=columns), batch_size=1, batch_format="pyarrow"
    )
    theirs = ray.data.read_webdataset(tars, decoder=None)
    results = {}
    for name, dataset in (("project reader", ours), ("ray read_webdataset", theirs)):
        started = time.perf_counter()
        rows = sum(len(b) for b in dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
        results[name] = rows / (time.perf_counter() - started)
        print(f"  {name}: {rows} rows, {results[name]:,.0f} rows/s")
    print(f"  ratio project/read_webdataset {results['project reader'] / results['ray read_webdataset']:.2f}")


def compare_split(stage_cfg, rows_per_group: int) -> None:
    """The metadata pass on one file: tasks of whole row groups against one task for the file."""
    seconds = {}
    for label, per_task in (("one task per file", 10**12), ("split by row groups", rows_per_group)):
        shutil.rmtree(stage_cfg.data.prepared_url, ignore_errors=True)
        stage_cfg.stage.rows_per_task = per_task
        manifest = stages.load("prepare").run(stage_cfg)
        seconds[label] = manifest["timings"]["scan"] + manifest["timings"]["prepare"]
        rows = manifest["counts"]["rows_in"]
        print(
            f"  {label}: {manifest['inputs']['units']} task(s), scan + prepare {rows / seconds[label]:,.0f} rows/s "
            f"({seconds[label]:.1f}s), kept {manifest['counts']['rows_out']}"
        )
    print(f"  ratio split/one task {seconds['one task per file'] / seconds['split by row groups']:.2f}")


def measure(label: str, stage_cfg, bare, *bare_args) -> None:
    """The stage cold (its first run in this process: for the metadata input, the first use of the Ray
    workers, process start-up and imports included; the image input then finds them started) and warm (run
    again from scratch on the same workers), and the bare loop, over the same rows."""
    timings = []
    for _ in ("cold", "warm"):
        shutil.rmtree(stage_cfg.data.prepared_url, ignore_errors=True)
        started = time.perf_counter()
        manifest = stages.load("prepare").run(stage_cfg)
        timings.append((time.perf_counter() - started, manifest["timings"]))
    rows = manifest["counts"]["rows_in"]
    started = time.perf_counter()
    bare_rows = bare(*bare_args)
    bare_s = time.perf_counter() - started
    assert bare_rows == rows, (bare_rows, rows)
    print(f"{label}: {rows} rows | bare loop {rows / bare_s:,.0f} rows/s ({bare_s:.1f}s)")
    for name, (seconds, steps) in zip(("cold", "warm"), timings):
        detail = ", ".join(f"{k} {v:.1f}s" for k, v in steps.items() if k != "seconds")
        print(
            f"  stage {name}: {rows / seconds:,.0f} rows/s ({seconds:.1f}s: {detail}) | ratio stage/bare "
            f"{bare_s / seconds:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metadata-rows", type=int, default=100_000)
    parser.add_argument("--metadata-files", type=int, default=8)
    parser.add_argument("--images", type=int, default=8000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    common = [f"storage.root={work}/store", f"tracking.uri=sqlite:///{work}/mlruns.db", "tracking.experiment=bench"]
    connect(config("stage=prepare", *common).cluster)  # Ray's start-up is not the stage's throughput

    rows = plan_rows(args.metadata_rows, 64, 0, {d: 0.01 for d in DEFECTS}, 0.15, rows_per_shard=10_000)
    table = laion_metadata_table(rows)
    meta_dir = work / "metadata"
    meta_dir.mkdir()
    per_file = -(-len(table) // args.metadata_files)
    paths = []
    for i in range(args.metadata_files):
        paths.append(str(meta_dir / f"part-{i:05d}.parquet"))
        pq.write_table(table.slice(i * per_file, per_file), paths[-1])
    # One pretrained tokenizer for both sides: tokenizer training is not what is being compared.
    tokenizer = train_wordpiece((r["TEXT"] or "" for r in rows), vocab_size=30522, max_length=77)
    storage = Storage(root=str(work))
    save_tokenizer(tokenizer, storage, str(work / "tokenizer"))
    tokenizer = load_tokenizer(str(work / "tokenizer"))
    pretrained = ["stage.tokenizer.train=false", f"stage.tokenizer.name_or_path={work}/tokenizer"]

    print(f"cores: {os.cpu_count()}, Ray CPUs: {config('stage=prepare').cluster.num_cpus}")
    measure(
        "metadata",
        config("stage=prepare", "data=synthetic_metadata", f"data.input.url={meta_dir}", *common, *pretrained),
        bare_metadata,
        paths,
        tokenizer,
    )

    synth = [f"data.num_samples={args.images}", *common]
    stages.load("synthesize").run(config("stage=synthesize", *synth, "stage.rows_per_shard=1000"))
    tars = sorted(str(p) for p in (work / "store" / "raw" / "webdataset").glob("*.tar"))
    measure("images", config("stage=prepare", *synth, *pretrained), bare_webdataset, tars, tokenizer)

    alone = work / "tars-alone"
    alone.mkdir()
    for tar in tars:
        shutil.copy(tar, alone)
    tars_alone = sorted(str(p) for p in alone.glob("*.tar"))
    measure(
        "images, tars alone",
        config(
            "stage=prepare", *common, *pretrained, "data=webdataset", f"data.input.url={alone}", "data.resolution=64"
        ),
        bare_tars,
        tars_alone,
        tokenizer,
    )
    print("tars alone, readers:")
    compare_tar_readers(tars_alone)

    one_file = work / "one-metadata-file"
    one_file.mkdir()
    groups = -(-len(table) // (2 * os.cpu_count()))  # as many row groups as twice the cores, as LAION's files have many
    pq.write_table(table, one_file / "part-00000.parquet", row_group_size=groups)
    print(f"metadata, one file of {len(table)} rows in row groups of {groups}:")
    compare_split(
        config("stage=prepare", "data=synthetic_metadata", f"data.input.url={one_file}", *common, *pretrained), groups
    )


if __name__ == "__main__":
    main()
