"""stage=prepare throughput against a bare single-process loop over the same rows, measured in one run.

Two inputs: ~100k synthesized LAION metadata rows (the pre-download pass) and synthesized img2dataset
webdataset shards (the image pass). The bare loop is what any script must do at the least: read the parquet
with pyarrow, tokenize the captions with the same tokenizer and, for images, open each one and read its size.
The stage does that plus every filter, global deduplication, bounded writes, drop logs and a manifest, on Ray.

    .venv/bin/python benchmarks/prepare.py [--metadata-rows 100000] [--images 8000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm.data.filters import probe_image  # noqa: E402
from ldm.synthetic.corpus import DEFECTS, laion_metadata_table, plan_rows  # noqa: E402
from ldm.text.tokenizer import load_tokenizer, save_tokenizer, tokenize, train_wordpiece  # noqa: E402
from ldm.storage import Storage  # noqa: E402
from pipelines import stages  # noqa: E402
from pipelines.config import compose as config  # noqa: E402
from pipelines.cluster import connect  # noqa: E402



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
        print(f"  stage {name}: {rows / seconds:,.0f} rows/s ({seconds:.1f}s: {detail}) | ratio stage/bare "
              f"{bare_s / seconds:.2f}")


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
        bare_metadata, paths, tokenizer,
    )

    synth = [f"data.num_samples={args.images}", *common]
    stages.load("synthesize").run(config("stage=synthesize", *synth, "stage.rows_per_shard=1000"))
    tars = sorted(str(p) for p in (work / "store" / "raw" / "webdataset").glob("*.tar"))
    measure("images", config("stage=prepare", *synth, *pretrained), bare_webdataset, tars, tokenizer)


if __name__ == "__main__":
    main()
