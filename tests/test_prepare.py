"""stage=prepare end to end on a real local Ray cluster, on a synthesized corpus whose every bad row is known:
local and S3 storage, the three input formats, resume after a kill, and the errors a user meets first."""

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BUCKET, ROOT, kill_midway
from PIL import Image

from ldm.data.prepare import HeldOut, prepared_schema
from ldm.data.sources import MissingColumnError
from ldm.manifest import verify
from ldm.storage import Storage
from ldm.synthetic import parse_caption
from ldm.synthetic.corpus import DEFECTS, LAION_SCHEMA
from ldm.text.tokenizer import load_tokenizer, train_wordpiece
from pipelines import stages
from pipelines.driver.config import compose
from pipelines.stages.prepare.stage import EmptyOutputError

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

N, PER_SHARD, FRACTION = 400, 25, 0.02
DATA = [f"data.num_samples={N}", *[f"data.bad_rows.{d}={FRACTION}" for d in DEFECTS]]
MAX_ROWS = 10  # small parts: several per input file

# The rule each injected defect must be dropped for, given images (img2dataset outputs) or metadata only.
IMAGE_REASON = {
    "undecodable": "undecodable",
    "truncated": "undecodable",
    "null_caption": "caption_length",
    "empty_caption": "caption_length",
    "nsfw": "nsfw",
    "unsure": "nsfw",
    "low_similarity": "similarity",
    "tiny": "image_size",
    "extreme_aspect": "aspect_ratio",
    "duplicate_url": "duplicate_url",
    "duplicate_image": "duplicate_image",
    "long_caption": "caption_length",
    "failed_download": "status",
}
# Without bytes there is no telling a broken, missing or repeated image: those rows are kept for img2dataset.
METADATA_REASON = {
    d: r for d, r in IMAGE_REASON.items() if d not in ("undecodable", "truncated", "duplicate_image", "failed_download")
}


def synthesize(tmp_path, *storage):
    cfg = compose(
        "stage=synthesize",
        *DATA,
        f"stage.rows_per_shard={PER_SHARD}",
        *storage,
        f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
    )
    return stages.load("synthesize").run(cfg)


@pytest.fixture(scope="module")
def corpus(ray_cluster, tmp_path_factory):
    """A synthesized corpus in local storage, and the truth about every row of it."""
    root = tmp_path_factory.mktemp("prepare")
    synthesize(root, f"storage.root={root}/store")
    truth = pq.read_table(root / "store" / "raw" / "_truth.parquet").to_pylist()
    return root, truth


def prepare_cfg(tmp_path, *overrides, data=DATA):
    return compose(
        "stage=prepare",
        *data,
        f"stage.max_rows_per_file={MAX_ROWS}",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
        *overrides,
    )


def read_dir(storage: Storage, url: str) -> pa.Table:
    fs, root = storage.fsspec(url)
    paths = sorted(fs.glob(f"{root}/*.parquet"))
    return pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in paths]) if paths else None


def kept_rows(storage: Storage, out: str) -> list[dict]:
    """Every kept row: the training shards and the held-out ones."""
    return [
        r for part in ("shards", "held_out") for r in (read_dir(storage, f"{out}/{part}") or pa.table({})).to_pylist()
    ]


def check_prepared(storage: Storage, out: str, truth: list[dict], fmt: str) -> dict:
    """Every bad row dropped for its reason, no good row dropped, counts adding up, tokens decoding back."""
    manifest = verify(storage, out, stage="prepare")
    reason_of = METADATA_REASON if fmt == "metadata" else IMAGE_REASON
    expected = {t["key"]: reason_of.get(t["defect"]) for t in truth}
    counts = manifest["counts"]
    assert counts["rows_in"] == N == counts["rows_out"] + sum(counts["dropped"].values())
    assert {r: n for r, n in counts["dropped"].items() if n} == dict(Counter(r for r in expected.values() if r))

    dropped = read_dir(storage, f"{out}/dropped").to_pylist()
    assert len(dropped) == sum(counts["dropped"].values())  # each dropped row logged once
    if fmt == "metadata":  # one metadata file: a row's index is its SAMPLE_ID
        by_id = {t["SAMPLE_ID"]: t["key"] for t in truth}
        assert {by_id[d["row"]]: d["reason"] for d in dropped} == {k: r for k, r in expected.items() if r}
        kept = read_dir(storage, f"{out}/metadata")
        assert kept.schema.names == LAION_SCHEMA.names
        assert sorted(by_id[i] for i in kept["SAMPLE_ID"].to_pylist()) == sorted(
            k for k, r in expected.items() if not r
        )
        return manifest

    assert {d["key"]: d["reason"] for d in dropped} == {k: r for k, r in expected.items() if r}
    fs, root = storage.fsspec(out)
    parts = sorted(fs.glob(f"{root}/shards/*.parquet") + fs.glob(f"{root}/held_out/*.parquet"))
    assert all(pq.read_metadata(fs.open(p, "rb")).num_rows <= MAX_ROWS for p in parts)
    # The manifest lists each training and held-out file's row groups as the files hold them (epochs are planned
    # from them without opening a file).
    footers = {p[len(root) + 1 :]: pq.read_metadata(fs.open(p, "rb")) for p in parts}
    assert manifest["row_groups"] == {
        name: [m.row_group(i).num_rows for i in range(m.num_row_groups)] for name, m in footers.items()
    }
    shards, held = read_dir(storage, f"{out}/shards"), read_dir(storage, f"{out}/held_out")
    assert shards.schema.equals(prepared_schema(77)) and held.schema.equals(prepared_schema(77))
    # The kept rows, split once by key: the held-out ones apart, where no training stage reads them.
    split = HeldOut(manifest["facts"]["held_out"]["fraction"], manifest["facts"]["held_out"]["salt"])
    assert all(key in split for key in held["key"].to_pylist()) and not any(
        key in split for key in shards["key"].to_pylist()
    )
    assert len(held) == manifest["counts"]["held_out"] == manifest["facts"]["held_out"]["rows"] > 0
    rows = shards.to_pylist() + held.to_pylist()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) and set(keys) == {k for k, r in expected.items() if not r}

    tokenizer = load_tokenizer(f"{out}/{manifest['facts']['tokenizer']['path']}", storage)
    assert len(tokenizer) == manifest["facts"]["tokenizer"]["vocab_size"]
    scene = {t["key"]: {f: t[f] for f in ("colour", "shape", "position", "background")} for t in truth}
    for row in rows:
        assert parse_caption(row["caption"]).as_dict() == scene[row["key"]]  # the caption of this very row
        assert tokenizer.decode(row["input_ids"], skip_special_tokens=True) == row["caption"].lower()
        assert row["attention_mask"] == [int(i != tokenizer.pad_token_id) for i in row["input_ids"]]
        assert hashlib.sha256(row["image"]).hexdigest() == row["sha256"]
        assert (row["width"], row["height"]) == (64, 64) and row["similarity"] >= 0.3
        # The class and layout (the synthetic corpus's label and boxes columns): this row's object and its box.
        [box] = json.loads(row["boxes"])
        assert row["label"] == box["label"] == f"{scene[row['key']]['colour']} {scene[row['key']]['shape']}"
        x0, y0, x1, y1 = box["box"]
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and (x0 < 0.5) == ("left" in scene[row["key"]]["position"])
    return manifest


def test_webdataset_to_local_drops_every_bad_row_for_its_reason_and_reruns_as_noop(corpus, capsys):
    root, truth = corpus
    cfg = prepare_cfg(root, f"storage.root={root}/store")
    storage = Storage.from_config(cfg.storage)
    out = f"{root}/store/prepared"
    first = stages.load("prepare").run(cfg)
    assert check_prepared(storage, out, truth, "webdataset") == first
    printed = capsys.readouterr().out
    assert f"{N} rows in, {first['counts']['rows_out']} kept" in printed and f"-> {out}" in printed
    assert re.search(rf"^ +duplicate_image +{round(FRACTION * N)}$", printed, re.M)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns.db")
    [run] = client.search_runs([client.get_experiment_by_name("ldm").experiment_id], "tags.stage = 'prepare'")
    metrics = run.data.metrics
    assert metrics["rows_in"] == N and metrics["dropped.undecodable"] == 2 * round(FRACTION * N)
    assert metrics["rows_out"] == first["counts"]["rows_out"] and metrics["vocab_size"] > 20

    again = stages.load("prepare").run(cfg)
    assert again["created_at"] == first["created_at"] and "nothing to do" in capsys.readouterr().out


def test_metadata_path_filters_before_download_and_prints_the_img2dataset_command(corpus, tmp_path, capsys):
    root, truth = corpus
    tokenizer = str(tmp_path / "my-tokenizer")  # a local tokenizer directory, as a user would give one
    train_wordpiece(["a red circle in the top left on a blue background"], 100, 77).save_pretrained(tokenizer)
    cfg = prepare_cfg(
        root,
        "data=synthetic_metadata",
        f"storage.root={root}/store",
        "stage.tokenizer.train=false",
        f"stage.tokenizer.name_or_path={tokenizer}",
    )
    storage = Storage.from_config(cfg.storage)
    manifest = stages.load("prepare").run(cfg)
    check_prepared(storage, f"{root}/store/metadata-filtered", truth, "metadata")
    command = manifest["facts"]["img2dataset_command"]
    assert command in capsys.readouterr().out
    assert command.startswith(f"img2dataset --url_list {root}/store/metadata-filtered/metadata --input_format parquet")
    assert "--url_col URL --caption_col TEXT" in command and f"--output_folder {root}/store/images" in command
    assert "--min_image_size 64 --max_aspect_ratio 2.0" in command and "--compute_hash sha256" in command
    assert """--save_additional_columns '["NSFW", "similarity", "WIDTH", "HEIGHT", "LICENSE"]'""" in command
    assert manifest["facts"]["unused_rules"]["undecodable"] == "metadata has no image bytes"
    assert (
        load_tokenizer(f"{root}/store/metadata-filtered/tokenizer").get_vocab() == load_tokenizer(tokenizer).get_vocab()
    )


def test_parquet_format_on_s3_is_tracked_on_the_mlflow_server(ray_cluster, s3_server, mlflow_server, tmp_path):
    s3 = ["storage=s3", f"storage.bucket={BUCKET}", "storage.prefix=prepare-e2e", f"storage.endpoint_url={s3_server}"]
    synthesize(tmp_path, *s3)
    cfg = prepare_cfg(
        tmp_path,
        *s3,
        "data.input.format=parquet",
        "tracking=server",
        f"tracking.uri={mlflow_server}",
        "stage.resources.dedup_on_driver_max_rows=0",  # the distributed shuffle, as at LAION scale
        "tracking.experiment=prepare-e2e",
    )
    storage = Storage.from_config(cfg.storage)
    truth = pq.read_table(
        storage.fsspec(f"s3://{BUCKET}/prepare-e2e/raw/_truth.parquet")[0].open(
            f"{BUCKET}/prepare-e2e/raw/_truth.parquet", "rb"
        )
    ).to_pylist()
    manifest = stages.load("prepare").run(cfg)
    assert manifest["inputs"]["url"] == f"s3://{BUCKET}/prepare-e2e/raw/parquet"
    check_prepared(storage, f"s3://{BUCKET}/prepare-e2e/prepared", truth, "parquet")

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name("prepare-e2e").experiment_id], "tags.stage = 'prepare'")
    assert run.data.metrics["dropped.duplicate_url"] == round(FRACTION * N)
    assert run.data.metrics["dropped.status"] == round(FRACTION * N)
    assert json.load(open(client.download_artifacts(run.info.run_id, "manifest.json")))["counts"] == manifest["counts"]


def test_a_run_killed_midway_completes_on_rerun_without_duplicate_or_missing_rows(corpus, tmp_path):
    root, truth = corpus
    out = tmp_path / "prepared"
    command = [
        sys.executable,
        str(ROOT / "pipelines" / "run.py"),
        "stage=prepare",
        *DATA,
        f"storage.root={root}/store",
        f"data.prepared_url={out}",
        f"stage.max_rows_per_file={MAX_ROWS}",
        f"tracking.uri=sqlite:///{tmp_path}/m.db",
        "stage.resources.num_cpus_per_task=4",  # one file at a time: a long window to be killed in
    ]
    done = out / "_work" / "done"
    kill_midway(command, tmp_path, done, markers=2)
    finished = sorted(done.glob("*.json"))
    assert 2 <= len(finished) < N // PER_SHARD, "the run was not caught mid-way"
    assert not (out / "_manifest.json").exists()

    # Parts of a file that was being written when the kill came must not survive into the result.
    unfinished = max(int(p.stem) for p in finished) + 1
    stale = [out / folder / f"part-{unfinished:05d}-0009.parquet" for folder in ("shards", "dropped")]
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(next((out / "shards").glob("part-*.parquet")).read_bytes())

    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    said = [line for line in result.stdout.splitlines() if line.startswith("prepare:")]
    assert f"prepare: resuming: {len(finished)} of {N // PER_SHARD} file(s) already prepared" in said, said
    assert not any(path.exists() for path in stale) and not (out / "_work").exists()
    check_prepared(Storage(root=str(tmp_path)), str(out), truth, "webdataset")


def test_errors_name_what_is_wrong(corpus, tmp_path):
    root, _ = corpus
    base = [f"storage.root={root}/store", f"data.prepared_url={tmp_path}/out"]
    with pytest.raises(MissingColumnError) as error:
        stages.load("prepare").run(prepare_cfg(tmp_path, *base, "data.input.caption_col=TEXT"))
    assert f"{root}/store/raw/webdataset/00000.parquet" in str(error.value)
    assert "'TEXT' (data.input.caption_col)" in str(error.value) and "'caption'" in str(error.value)

    with pytest.raises(FileNotFoundError, match=f"data.input.url={tmp_path}/missing: no such file"):
        stages.load("prepare").run(prepare_cfg(tmp_path, *base, f"data.input.url={tmp_path}/missing"))

    with pytest.raises(EmptyOutputError, match=r"every one of the 400 input rows .*'similarity': 3\d\d"):
        stages.load("prepare").run(prepare_cfg(tmp_path, *base, "stage.filters.min_similarity=0.9"))
    assert not (tmp_path / "out" / "_manifest.json").exists()


CAPTIONS = Path(ROOT).parent / "shared" / "data" / "laion_captions_10000.parquet"


@pytest.mark.skipif(not CAPTIONS.exists(), reason=f"{CAPTIONS} is not on this machine")
def test_real_laion_captions_through_the_metadata_path_with_a_trained_tokenizer(ray_cluster, tmp_path):
    cfg = prepare_cfg(
        tmp_path,
        "data=url_list",
        f"data.input.url={CAPTIONS}",
        "data.input.url_col=URL",
        "data.input.caption_col=TEXT",
        f"storage.root={tmp_path}/store",
        "stage.max_rows_per_file=4000",
        data=[],
    )
    manifest = stages.load("prepare").run(cfg)
    counts = manifest["counts"]
    assert counts["rows_in"] == 10_000 and counts["rows_out"] + sum(counts["dropped"].values()) == 10_000
    assert counts["dropped"]["caption_denylist"] > 0 and counts["dropped"]["caption_length"] > 0
    kept = read_dir(Storage.from_config(cfg.storage), f"{tmp_path}/store/url_list/metadata-filtered/metadata")
    assert kept.num_rows == counts["rows_out"] and kept.column_names[:2] == ["URL", "TEXT"]
    texts = kept["TEXT"].to_pylist()
    assert all(5 <= len(" ".join(t.split())) <= 512 for t in texts)
    denied = [re.compile(p, re.I) for p in cfg.stage.filters.caption_denylist]
    assert not any(p.search(" ".join(t.split())) for p in denied for t in texts)
    assert len(set(kept["URL"].to_pylist())) == kept.num_rows
    tokenizer = load_tokenizer(f"{tmp_path}/store/url_list/metadata-filtered/tokenizer")
    assert manifest["facts"]["tokenizer"]["vocab_size"] == len(tokenizer) > 5000


def copy_tars(storage: Storage, source: Path, url: str) -> None:
    """The corpus's tars alone, as the hub ships image-text sets: no img2dataset parquet beside them."""
    fs, root = storage.fsspec(url)
    fs.makedirs(root, exist_ok=True)
    for tar in sorted(source.glob("*.tar")):
        fs.pipe_file(f"{root}/{tar.name}", tar.read_bytes())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_tars_alone_prepare_to_the_same_kept_keys_as_with_their_parquets(corpus, where, request, tmp_path):
    root, truth = corpus
    if where == "s3":
        endpoint = request.getfixturevalue("s3_server")
        store = [
            "storage=s3",
            f"storage.bucket={BUCKET}",
            "storage.prefix=tars-alone",
            f"storage.endpoint_url={endpoint}",
        ]
        tars = f"s3://{BUCKET}/tars-alone/hub/cc"
    else:
        store, tars = [f"storage.root={tmp_path}/store"], f"{tmp_path}/hub/cc"
    cfg = prepare_cfg(tmp_path, *store, f"data.input.url={tars}")
    storage = Storage.from_config(cfg.storage)
    copy_tars(storage, root / "store" / "raw" / "webdataset", tars)
    manifest = stages.load("prepare").run(cfg)

    # Failed downloads are not in a tar: only img2dataset's parquet knew about them. Everything else is the
    # same as with the parquets: each bad row dropped for its reason, every good row kept.
    expected = {
        t["key"]: IMAGE_REASON[t["defect"]] if t["defect"] else None for t in truth if t["defect"] != "failed_download"
    }
    counts = manifest["counts"]
    assert counts["rows_in"] == len(expected) == counts["rows_out"] + sum(counts["dropped"].values())
    assert {r: n for r, n in counts["dropped"].items() if n} == dict(Counter(r for r in expected.values() if r))
    out = cfg.data.prepared_url
    assert sorted(r["key"] for r in kept_rows(storage, out)) == sorted(k for k, r in expected.items() if not r)
    assert {d["key"]: d["reason"] for d in read_dir(storage, f"{out}/dropped").to_pylist()} == {
        k: r for k, r in expected.items() if r
    }
    assert manifest["facts"]["unused_rules"] == {} and manifest["inputs"]["url"] == tars


def write_images_and_captions(folder: Path, form: str, rows: int = 30) -> dict[str, str]:
    """An image-caption set with nothing else per sample, as a tar (jpg or png, and a .txt) or as the hub's
    parquet ({bytes, path} images): key -> caption."""
    from ldm.synthetic.render import encode_jpeg, render
    from ldm.synthetic.scene import all_scenes, caption

    folder.mkdir(parents=True)
    scenes = all_scenes()
    captions, samples = {}, []
    for i in range(rows):
        scene = scenes[(i * 37) % len(scenes)]
        pixels = render(scene, 64, 64, seed=i)
        if i % 3 == 0:
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            data, ext = buffer.getvalue(), "png"
        else:
            data, ext = encode_jpeg(pixels, 90), "jpg"
        key = f"sample{i:04d}"
        captions[key] = caption(scene, i % 3)
        samples.append((key, ext, data, captions[key]))
    if form == "tar":
        with tarfile.open(folder / "shard-000.tar", "w") as tar:
            for key, ext, data, text in samples:
                for name, payload in ((f"{key}.{ext}", data), (f"{key}.txt", text.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        return captions
    table = pa.table(
        {
            "image": [{"bytes": data, "path": f"{key}.{ext}"} for key, ext, data, _ in samples],
            "caption": [text for *_, text in samples],
        }
    )
    pq.write_table(table, folder / "train-00000-of-00001.parquet")
    return {f"train-00000-of-00001-{i}": text for i, (*_, text) in enumerate(samples)}


@pytest.mark.parametrize("data", ["webdataset", "image_parquet"])
def test_a_set_of_only_images_and_captions_prepares_with_no_column_override(ray_cluster, data, tmp_path, capsys):
    captions = write_images_and_captions(tmp_path / "set", "tar" if data == "webdataset" else "parquet")
    cfg = prepare_cfg(
        tmp_path,
        f"data={data}",
        f"data.input.url={tmp_path}/set",
        "data.resolution=64",
        f"storage.root={tmp_path}/store",
        data=[],
    )
    manifest = stages.load("prepare").run(cfg)
    off = {"status", "nsfw", "similarity", "duplicate_url"}
    assert set(manifest["facts"]["unused_rules"]) == off
    assert manifest["facts"]["unused_rules"]["similarity"] == "no 'similarity' column in the data"
    [said] = [line for line in capsys.readouterr().out.splitlines() if "rules off for this input" in line]
    assert all(f"{rule} (" in said for rule in off)
    assert manifest["counts"]["rows_out"] == len(captions)
    shards = kept_rows(Storage.from_config(cfg.storage), cfg.data.prepared_url)
    assert {r["key"]: r["caption"] for r in shards} == captions
    assert {(r["width"], r["height"]) for r in shards} == {(64, 64)}


def test_a_metadata_file_split_across_tasks_keeps_what_one_task_per_file_keeps(corpus, tmp_path):
    root, truth = corpus
    metadata = pq.read_table(root / "store" / "raw" / "metadata")
    pq.write_table(
        metadata, tmp_path / "laion-part-0.parquet", row_group_size=50
    )  # 8 row groups, as LAION's files have many
    cfg = prepare_cfg(
        root,
        "data=synthetic_metadata",
        f"data.input.url={tmp_path}/laion-part-0.parquet",
        f"storage.root={tmp_path}/store",
        "stage.rows_per_task=100",
    )
    manifest = stages.load("prepare").run(cfg)
    assert manifest["inputs"]["files"] == 1 and manifest["inputs"]["units"] == 4
    check_prepared(Storage.from_config(cfg.storage), f"{tmp_path}/store/metadata-filtered", truth, "metadata")
