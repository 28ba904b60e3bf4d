"""stage=synthesize end to end on a real local Ray cluster: local storage, S3 + an MLflow server, and the CLI."""

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import BUCKET, ROOT, TEST_SECRET
from PIL import Image

from ldm.manifest import IncompleteOutputError, verify
from ldm.storage import Storage
from ldm.synthetic import classify, parse_caption
from ldm.synthetic.corpus import DEFECTS, IMG2DATASET_META_SCHEMA, IMG2DATASET_PARQUET_SCHEMA, LAION_SCHEMA
from pipelines import stages
from pipelines.driver.config import compose

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

N, RES, PER_SHARD = 300, 64, 120
SMALL = [
    "stage=synthesize",
    f"data.num_samples={N}",
    f"data.resolution={RES}",
    f"stage.rows_per_shard={PER_SHARD}",
    *[f"data.bad_rows.{d}=0.02" for d in DEFECTS],
]


def read_parquets(fs, paths):
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in sorted(paths)])


def observed_defect(meta, image, resolution, seen_urls, seen_hashes):
    """The defect a row shows in the data, judged from the data alone."""
    if meta["status"] != "success":
        return "failed_download"
    try:
        opened = Image.open(io.BytesIO(image))
    except Exception:
        return "undecodable"
    try:
        opened.load()
    except OSError:
        return "truncated"
    text = meta["caption"]
    width, height = opened.size
    checks = [
        ("null_caption", text is None),
        ("empty_caption", text is not None and not text.strip()),
        ("nsfw", meta["NSFW"] == "NSFW"),
        ("unsure", meta["NSFW"] == "UNSURE"),
        ("low_similarity", meta["similarity"] < 0.3),
        ("tiny", min(width, height) < resolution / 2),
        ("extreme_aspect", max(width, height) / min(width, height) >= 3),
        ("duplicate_url", meta["url"] in seen_urls),
        ("duplicate_image", meta["sha256"] in seen_hashes),
        ("long_caption", text is not None and len(text) > 300),
    ]
    found = [name for name, hit in checks if hit]
    assert len(found) <= 1, f"{meta['key']} shows several defects: {found}"
    return found[0] if found else None


def check_corpus(storage: Storage, raw: str, num_samples: int, resolution: int, fraction: float):
    """Everything a consumer of raw/ relies on, checked from the files themselves."""
    manifest = verify(storage, raw, stage="synthesize")
    fs, root = storage.fsspec(raw)

    metadata = read_parquets(fs, fs.glob(f"{root}/metadata/*.parquet"))
    assert metadata.schema.equals(LAION_SCHEMA, check_metadata=False)
    assert metadata.num_rows == num_samples
    assert metadata.column("SAMPLE_ID").to_pylist() == list(range(num_samples))

    truth = pq.read_table(fs.open(f"{root}/_truth.parquet", "rb")).to_pylist()
    shards = sorted(p.rsplit("/", 1)[-1][:5] for p in fs.glob(f"{root}/webdataset/*.tar"))
    assert shards == [f"{i:05d}" for i in range(-(-num_samples // PER_SHARD))]

    metas, wds_images, parquet_images = [], {}, {}
    for shard in shards:
        meta = pq.read_table(fs.open(f"{root}/webdataset/{shard}.parquet", "rb"))
        assert meta.schema.equals(IMG2DATASET_META_SCHEMA, check_metadata=False)
        stats = json.loads(fs.cat_file(f"{root}/webdataset/{shard}_stats.json"))
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"{root}/webdataset/{shard}.tar"))) as tar:
            members = defaultdict(dict)
            for member in tar.getmembers():
                key, ext = member.name.split(".")
                members[key][ext] = tar.extractfile(member).read()
        successes = [m for m in meta.to_pylist() if m["status"] == "success"]
        assert sorted(members) == sorted(m["key"] for m in successes)
        for m in successes:
            sample = members[m["key"]]
            assert set(sample) == {"jpg", "txt", "json"}
            assert json.loads(sample["json"]) == m
            assert sample["txt"].decode() == (m["caption"] or "")
            wds_images[m["key"]] = sample["jpg"]
        assert stats["count"] == meta.num_rows and stats["successes"] == len(successes)
        assert stats["failed_to_download"] == meta.num_rows - len(successes)
        assert sum(stats["status_dict"].values()) == stats["count"]

        as_parquet = pq.read_table(fs.open(f"{root}/parquet/{shard}.parquet", "rb"))
        assert as_parquet.schema.equals(IMG2DATASET_PARQUET_SCHEMA, check_metadata=False)
        assert json.loads(fs.cat_file(f"{root}/parquet/{shard}_stats.json")) == stats
        for row in as_parquet.to_pylist():
            parquet_images[row["key"]] = row["jpg"]
        metas += meta.to_pylist()

    assert {k: v for k, v in parquet_images.items() if v is not None} == wds_images
    assert [m["key"] for m in metas] == [t["key"] for t in truth]
    assert [m["url"] for m in metas] == metadata.column("URL").to_pylist()
    assert [m["caption"] for m in metas] == metadata.column("TEXT").to_pylist()

    seen_urls, seen_hashes, observed = set(), set(), {}
    correct = clean = 0
    for meta, true in zip(metas, truth):
        image = wds_images.get(meta["key"])
        observed[meta["key"]] = observed_defect(meta, image, resolution, seen_urls, seen_hashes)
        seen_urls.add(meta["url"])
        seen_hashes.add(meta["sha256"])
        if true["defect"] is None:
            clean += 1
            pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
            correct += classify(pixels) == parse_caption(meta["caption"])
    assert observed == {t["key"]: t["defect"] for t in truth}
    expected = {d: round(fraction * num_samples) for d in DEFECTS}
    assert Counter(d for d in observed.values() if d) == expected
    assert manifest["counts"]["bad_rows"] == expected
    assert correct / clean >= 0.99
    return manifest


def test_synthesize_to_local_storage_reruns_as_noop_and_repairs_incomplete(ray_cluster, tmp_path, capsys):
    cfg = compose(*SMALL, f"storage.root={tmp_path}/store", f"tracking.uri=sqlite:///{tmp_path}/mlruns.db")
    storage = Storage.from_config(cfg.storage)
    raw = f"{tmp_path}/store/raw"
    first = stages.load("synthesize").run(cfg)
    assert check_corpus(storage, raw, N, RES, 0.02)["fingerprint"] == first["fingerprint"]
    assert f"to {raw}" in capsys.readouterr().out

    again = stages.load("synthesize").run(cfg)
    assert again["created_at"] == first["created_at"]
    assert "nothing to do" in capsys.readouterr().out

    fs, root = storage.fsspec(raw)
    fs.rm(f"{root}/_manifest.json")
    fs.rm(f"{root}/webdataset/00001.tar")
    with pytest.raises(IncompleteOutputError, match="incomplete"):
        verify(storage, raw, stage="synthesize")
    stages.load("synthesize").run(cfg)
    check_corpus(storage, raw, N, RES, 0.02)

    with pytest.raises(FileExistsError, match="overwrite"):
        stages.load("synthesize").run(
            compose(
                *SMALL, "data.seed=5", f"storage.root={tmp_path}/store", f"tracking.uri=sqlite:///{tmp_path}/mlruns.db"
            )
        )


def test_synthesize_to_s3_is_tracked_on_the_mlflow_server_without_secrets(ray_cluster, s3_server, mlflow_server):
    prefix = "synth-e2e"
    cfg = compose(
        *SMALL,
        "storage=s3",
        f"storage.bucket={BUCKET}",
        f"storage.prefix={prefix}",
        f"storage.endpoint_url={s3_server}",
        "tracking=server",
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=synthesize-e2e",
        # A user who puts a credential into the config anyway must not see it in MLflow.
        f"+storage.aws_secret_access_key={TEST_SECRET}",
    )
    stages.load("synthesize").run(cfg)
    storage = Storage.from_config(cfg.storage)
    check_corpus(storage, f"s3://{BUCKET}/{prefix}/raw", N, RES, 0.02)

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("synthesize-e2e")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "synthesize" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["storage.endpoint_url"] == s3_server
    assert params["storage.root"] == f"s3://{BUCKET}/{prefix}"
    assert params["data.num_samples"] == str(N)
    assert params["storage.aws_secret_access_key"] == "***"
    assert run.data.metrics["rows"] == N
    assert run.data.metrics["bad_rows.nsfw"] == round(0.02 * N)

    config_path = client.download_artifacts(run.info.run_id, "config.yaml")
    config_text = open(config_path).read()
    assert yaml.safe_load(config_text)["storage"]["endpoint_url"] == s3_server
    assert TEST_SECRET not in config_text
    assert all(TEST_SECRET not in str(v) for v in params.values())
    manifest_path = client.download_artifacts(run.info.run_id, "manifest.json")
    assert json.load(open(manifest_path))["counts"]["rows"] == N


def test_local_storage_on_a_remote_cluster_is_refused_before_anything_runs(tmp_path):
    cfg = compose(*SMALL, "cluster=remote", f"storage.root={tmp_path}/store")
    with pytest.raises(ValueError, match="storage=s3, or storage.shared=true"):
        stages.load("synthesize").run(cfg)
    assert not (tmp_path / "store").exists()


def test_demo_command_runs_from_the_command_line_and_says_where_outputs_are(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pipelines" / "run.py"),
            "stage=synthesize",
            "data.num_samples=60",
            "stage.rows_per_shard=30",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 60 rows" in result.stdout and str(tmp_path / "store" / "raw") in result.stdout
    # The printed UI command leaves out MLflow's job consumers, which this project never uses.
    assert (
        f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false {Path(sys.executable).parent}/mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlruns.db"
        in result.stdout
    )
    assert (tmp_path / "store" / "raw" / "_manifest.json").exists()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    experiment = client.get_experiment_by_name("ldm")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["synthesize"]
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view
