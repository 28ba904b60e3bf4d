"""Storage URLs -> filesystems, manifests as commit markers, fingerprints; on local disk and on S3."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BUCKET

from ldm.manifest import IncompleteOutputError, claim_output, fingerprint, read_manifest, verify, write_manifest
from ldm.storage import Storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage.from_config({"root": str(tmp_path / "store")})
    endpoint = request.getfixturevalue("s3_server")
    return Storage.from_config(
        {"root": f"s3://{BUCKET}/{tmp_path.name}", "endpoint_url": endpoint, "region": "us-east-1"}
    )


def write_output(storage, url):
    fs, root = storage.fsspec(url)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/a.txt", b"hello")
    fs.makedirs(f"{root}/sub", exist_ok=True)
    fs.pipe_file(f"{root}/sub/b.bin", b"\x00" * 10)


def test_pyarrow_and_fsspec_views_agree(storage):
    url = storage.url("tables")
    pa_fs, path = storage.pyarrow(url)
    pa_fs.create_dir(path, recursive=True)
    pq.write_table(pa.table({"x": [1, 2, 3]}), f"{path}/t.parquet", filesystem=pa_fs)
    fs, fpath = storage.fsspec(url)
    with fs.open(f"{fpath}/t.parquet", "rb") as f:
        assert pq.read_table(f).column("x").to_pylist() == [1, 2, 3]


def test_manifest_commits_and_verifies_an_output(storage):
    url = storage.url("out")
    write_output(storage, url)
    with pytest.raises(IncompleteOutputError, match="incomplete.*stage=demo"):
        verify(storage, url, stage="demo")

    written = write_manifest(storage, url, stage="demo", fingerprint="f" * 64, counts={"rows": 2})
    assert written["files"] == {"a.txt": 5, "sub/b.bin": 10}
    manifest = verify(storage, url, stage="demo")
    assert manifest["counts"] == {"rows": 2} and manifest["fingerprint"] == "f" * 64

    with pytest.raises(IncompleteOutputError, match="not 'other'"):
        verify(storage, url, stage="other")
    fs, root = storage.fsspec(url)
    fs.rm(f"{root}/sub/b.bin")
    with pytest.raises(IncompleteOutputError, match="sub/b.bin"):
        verify(storage, url)


def test_claim_output_skips_same_config_clears_partial_and_protects_others(storage):
    url = storage.url("claimed")
    write_output(storage, url)
    assert claim_output(storage, url, stage="demo", fingerprint="one") is None  # partial: cleared
    assert not storage.fsspec(url)[0].exists(storage.fsspec(url)[1])

    write_output(storage, url)
    write_manifest(storage, url, stage="demo", fingerprint="one")
    assert claim_output(storage, url, stage="demo", fingerprint="one")["fingerprint"] == "one"
    with pytest.raises(FileExistsError, match="overwrite"):
        claim_output(storage, url, stage="demo", fingerprint="two")
    assert read_manifest(storage, url) is not None
    assert claim_output(storage, url, stage="demo", fingerprint="two", overwrite=True) is None
    assert read_manifest(storage, url) is None


def test_fingerprint_follows_config_and_inputs():
    base = fingerprint({"a": 1, "b": {"c": [1, 2]}}, ["x", "y"])
    assert base == fingerprint({"b": {"c": [1, 2]}, "a": 1}, ["y", "x"])
    assert base != fingerprint({"a": 2, "b": {"c": [1, 2]}}, ["x", "y"])
    assert base != fingerprint({"a": 1, "b": {"c": [1, 2]}}, ["x", "z"])


def test_relative_local_root_is_pinned_and_bad_schemes_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Storage.from_config({"root": "store"}).root == str(tmp_path / "store")
    with pytest.raises(ValueError, match="gs://bucket"):
        Storage.from_config({"root": "gs://bucket/x"})
