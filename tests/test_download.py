"""stage=download against a real HTTP server on 127.0.0.1 that fails the way LAION's URLs do: every URL ends
downloaded or counted under its failure, locally and on S3; a run killed mid-download resumes to the same
samples, none twice; and prepare reads what it wrote."""

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from collections import Counter

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BUCKET, ROOT, kill_when

from ldm.data.download import carried_columns, outcome, plan_shards, shard_rows
from ldm.data.sources import Columns
from ldm.storage import Storage
from pipelines import stages
from pipelines.driver.config import compose

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

N, PER_SHARD = 300, 40
# A short timeout, so that the server's slow answers fail fast; no retry, so that each costs one timeout.
DOWNLOAD = [
    "stage.timeout=2",
    "stage.retries=0",
    f"stage.number_sample_per_shard={PER_SHARD}",
    "stage.resources.thread_count=16",
]


@pytest.fixture(scope="module")
def metadata(ray_cluster, corpus_server, tmp_path_factory):
    """A synthesized corpus whose URLs the server answers, with its metadata filtered by stage=prepare."""
    root = tmp_path_factory.mktemp("download")
    common = [
        "data=synthetic_metadata",
        f"data.num_samples={N}",
        f"data.image_host={corpus_server.url}",
        *located(root),
    ]
    stages.load("synthesize").run(compose("stage=synthesize", *common, "stage.rows_per_shard=100"))
    corpus_server.load(root / "store" / "raw")
    prepared = stages.load("prepare").run(compose("stage=prepare", *common))
    kept = pq.read_table(root / "store" / "metadata-filtered" / "metadata").to_pylist()
    assert len(kept) == prepared["counts"]["rows_out"]
    return root, common, kept


def located(root) -> list[str]:
    return [f"storage.root={root}/store", f"tracking.uri=sqlite:///{root}/mlruns.db"]


def downloaded(storage: Storage, url: str) -> tuple[list[dict], dict[str, bytes]]:
    """Every row img2dataset accounted for (its per-shard parquet), and the images in its tars by key."""
    fs, root = storage.fsspec(url)
    rows, images = [], {}
    for path in sorted(fs.glob(f"{root}/*.parquet")):
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    for path in sorted(fs.glob(f"{root}/*.tar")):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    assert member.name[:-4] not in images, f"{member.name} twice"
                    images[member.name[:-4]] = tar.extractfile(member).read()
    return rows, images


def check_download(storage, url, kept, server, manifest):
    """Each kept URL once, with the outcome its fate on the server implies; the images as served."""
    rows, images = downloaded(storage, url)
    assert sorted(r["url"] for r in rows) == sorted(r["URL"] for r in kept)
    expected = {
        "image": {"success"},
        "redirect": {"success"},
        "not_an_image": {"not_an_image"},
        "half_an_image": {"success", "not_an_image"},
        **{f: {f} for f in server.FAILURES},
    }
    for row in rows:
        assert outcome(row["status"], row["error_message"]) in expected[server.fate(row["url"])], row
    counts = Counter(outcome(r["status"], r["error_message"]) for r in rows)
    assert manifest["counts"]["success"] == counts["success"] == len(images) > 0
    assert manifest["counts"]["failed"] == {k: n for k, n in counts.items() if k != "success"}
    assert manifest["counts"]["rows"] == len(kept)
    assert set(manifest["counts"]["failed"]) >= {"http_404", "http_500", "body_cut_short", "timeout", "not_an_image"}
    by_key = {r["key"]: r for r in rows}
    for key, image in images.items():
        assert hashlib.sha256(image).hexdigest() == by_key[key]["sha256"]
        assert by_key[key]["NSFW"] == "UNLIKELY" and by_key[key]["similarity"] >= 0.3  # the carried LAION columns
    return rows


def test_every_url_ends_downloaded_or_counted_under_its_failure_on_s3(metadata, corpus_server, s3_server, capsys):
    root, common, kept = metadata
    out = f"s3://{BUCKET}/download/images"
    place = [
        "storage=s3",
        f"storage.bucket={BUCKET}",
        "storage.prefix=download",
        f"storage.endpoint_url={s3_server}",
        f"data.prepared_url={root}/store/metadata-filtered",
    ]
    cfg = compose("stage=download", *common, *place, f"data.images_url={out}", *DOWNLOAD)
    manifest = stages.load("download").run(cfg)
    check_download(Storage.from_config(cfg.storage), out, kept, corpus_server, manifest)
    printed = capsys.readouterr().out
    assert f"download: {manifest['counts']['success']} of {len(kept)} images downloaded" in printed
    assert "  http_404 " in printed and "stage=prepare data.input.url=" in printed

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns.db")
    experiment = client.get_experiment_by_name("ldm").experiment_id
    run = client.search_runs([experiment], "tags.stage = 'download'", order_by=["attributes.start_time DESC"])[0]
    assert run.data.metrics["success"] == manifest["counts"]["success"]
    assert run.data.metrics["failed.timeout"] == manifest["counts"]["failed"]["timeout"]


def test_a_download_killed_midway_resumes_to_the_same_samples_none_twice(metadata, corpus_server, tmp_path):
    root, common, kept = metadata
    out = tmp_path / "images"
    command = [
        sys.executable,
        str(ROOT / "pipelines" / "run.py"),
        "stage=download",
        *common,
        f"data.images_url={out}",
        *DOWNLOAD,
        "stage.resources.max_shards_at_once=1",
        f"tracking.uri=sqlite:///{tmp_path}/m.db",
    ]
    shards = -(-len(kept) // PER_SHARD)
    kill_when(command, tmp_path, lambda: len(list(out.glob("*_stats.json"))) >= 2)
    finished = len(list(out.glob("*_stats.json")))
    assert 2 <= finished < shards, "the run was not caught mid-way"
    assert not (out / "_manifest.json").exists()

    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"resuming: {finished} shard(s) already downloaded" in result.stdout
    manifest = json.loads((out / "_manifest.json").read_text())
    check_download(Storage(root=str(tmp_path)), str(out), kept, corpus_server, manifest)

    # What it wrote is img2dataset's layout: stage=prepare reads it with data=laion400m, every LAION rule on.
    prepared = stages.load("prepare").run(
        compose(
            "stage=prepare",
            *located(root),
            "data=laion400m",
            "data.resolution=64",
            f"data.input.url={out}",
            f"data.prepared_url={tmp_path}/prepared",
            "data.input.width_col=WIDTH",
            "data.input.height_col=HEIGHT",
        )
    )
    assert prepared["facts"]["unused_rules"] == {} and prepared["counts"]["rows_in"] == len(kept)
    assert prepared["counts"]["dropped"]["status"] == len(kept) - manifest["counts"]["success"]


def test_shards_are_consecutive_rows_read_from_their_row_groups_and_clashing_columns_are_refused(tmp_path):
    assert [s.pieces for s in plan_shards([("a", 5), ("b", 4)], 4)] == [
        (("a", 0, 4),),
        (("a", 4, 5), ("b", 0, 3)),
        (("b", 3, 4),),
    ]
    rows = pa.table(
        {"URL": [f"u{i}" for i in range(10)], "TEXT": [f"t{i}" for i in range(10)], "NSFW": ["UNLIKELY"] * 10}
    )
    pq.write_table(rows, tmp_path / "m.parquet", row_group_size=3)
    columns = Columns(url="URL", caption="TEXT", nsfw="NSFW")
    [_, second, _] = plan_shards([(str(tmp_path / "m.parquet"), 10)], 4)
    got = shard_rows(Storage(root=str(tmp_path)), second, columns, carried_columns(columns))
    assert got.column_names == ["NSFW", "caption", "url"] and got["url"].to_pylist() == ["u4", "u5", "u6", "u7"]

    with pytest.raises(ValueError, match=r"data.input.width_col='width'.*data.input.extra_columns='status'"):
        carried_columns(Columns(url="URL", caption="TEXT", width="width", height="HEIGHT"), ["LICENSE", "status"])
