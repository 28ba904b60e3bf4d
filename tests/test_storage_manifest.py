"""Storage URLs -> filesystems, manifests as commit markers, fingerprints; on local disk and on S3."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BUCKET

from ldm.manifest import (
    MANIFEST_NAME,
    IncompleteOutputError,
    claim_output,
    fingerprint,
    list_files,
    read_manifest,
    verify,
    write_manifest,
)
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
    assert claim_output(storage, url, stage="demo", fingerprint="one") is None  # fresh location
    write_output(storage, url)  # ... and the run dies here, before its manifest
    assert claim_output(storage, url, stage="demo", fingerprint="one") is None  # its partial output: cleared
    assert list_files(storage, url) == {}

    write_output(storage, url)
    write_manifest(storage, url, stage="demo", fingerprint="one")
    assert claim_output(storage, url, stage="demo", fingerprint="one")["fingerprint"] == "one"
    with pytest.raises(FileExistsError, match="overwrite"):
        claim_output(storage, url, stage="demo", fingerprint="two")
    assert read_manifest(storage, url) is not None
    assert claim_output(storage, url, stage="demo", fingerprint="two", overwrite=True) is None
    assert read_manifest(storage, url) is None


def test_claim_output_never_deletes_files_no_stage_wrote(storage):
    url = storage.url("real-downloads")
    write_output(storage, url)
    with pytest.raises(FileExistsError, match="no stage of this pipeline wrote"):
        claim_output(storage, url, stage="demo", fingerprint="one", overwrite=True)
    assert list_files(storage, url) == {"a.txt": 5, "sub/b.bin": 10}


def test_a_manifest_is_only_written_when_every_reported_file_is_visible(storage):
    url = storage.url("out")
    write_output(storage, url)
    with pytest.raises(IncompleteOutputError, match="not visible"):
        write_manifest(storage, url, stage="demo", fingerprint="f", expected_files={"a.txt": 5, "c/d.bin": 3})
    assert read_manifest(storage, url) is None
    write_manifest(storage, url, stage="demo", fingerprint="f", expected_files={"a.txt": 5, "sub/b.bin": 10})
    assert verify(storage, url)["fingerprint"] == "f"


def test_unreadable_manifest_counts_as_incomplete_and_directory_markers_are_not_files(storage):
    url = storage.url("out")
    write_output(storage, url)
    pa_fs, path = storage.pyarrow(url)
    pa_fs.create_dir(f"{path}/empty/dir", recursive=True)  # on S3: zero-byte "dir/" marker objects
    fs, root = storage.fsspec(url)
    fs.pipe_file(f"{root}/{MANIFEST_NAME}", b'{"stage": "demo", "fingerp')  # a write cut short
    assert read_manifest(storage, url) is None
    assert list_files(storage, url) == {"a.txt": 5, "sub/b.bin": 10}


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
    with pytest.raises(ValueError, match="file://store/raw"):
        Storage.from_config({"root": "file://store/raw"})
    assert Storage.from_config({"root": "file:///data/x/"}).root == "/data/x"
