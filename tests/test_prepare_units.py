"""The pieces of stage=prepare on their own, without Ray: rules, image probing, deduplication, bounded parts,
the tokenizer, and one input file through prepare_unit."""

import hashlib
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BUCKET
from PIL import Image

from ldm.data.filters import (
    Filters,
    dedup_keys,
    image_keys,
    later_duplicates,
    metadata_reasons,
    normalise_captions,
    probe_image,
    url_keys,
)
from ldm.data.parts import PartWriter
from ldm.data.prepare import prepare_unit, scan_unit, unused_rules
from ldm.data.sources import (
    IMAGE,
    KEY,
    ROW,
    Columns,
    MissingColumnError,
    Unit,
    UnreadableInputError,
    available_columns,
    check_columns,
    checked,
    list_units,
    read_metadata,
    read_samples,
)
from ldm.storage import Storage
from ldm.synthetic.corpus import img2dataset_shard, plan_rows
from ldm.text.tokenizer import load_tokenizer, save_tokenizer, tokenize, train_wordpiece

RULES = Filters(
    status="success",
    min_similarity=0.3,
    nsfw_allowed=("UNLIKELY",),
    min_width=64,
    min_height=64,
    max_aspect_ratio=2.0,
    caption_min_chars=5,
    caption_max_chars=40,
    caption_denylist=(r"^\S+\.jpe?g$",),
)


def jpeg(width=64, height=64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
        buffer, "JPEG", quality=90
    )
    return buffer.getvalue()


def test_each_row_gets_the_first_metadata_rule_it_fails_and_unknowns_are_handled_on_purpose():
    rows = [
        # status, caption, nsfw, similarity, width, height -> expected
        ("success", "a red circle", "UNLIKELY", 0.35, 64, 64, None),
        ("failed_to_download", None, "NSFW", 0.1, 1, 1, "status"),  # every rule fails: the first is charged
        ("success", None, "UNLIKELY", 0.35, 64, 64, "caption_length"),
        ("success", "  \t ", "UNLIKELY", 0.35, 64, 64, "caption_length"),
        ("success", "x" * 41, "UNLIKELY", 0.35, 64, 64, "caption_length"),
        ("success", "IMG_0042.JPG", "UNLIKELY", 0.35, 64, 64, "caption_denylist"),
        ("success", "a red circle", "UNSURE", 0.1, 64, 64, "nsfw"),
        ("success", "a red circle", None, 0.35, 64, 64, "nsfw"),
        ("success", "a red circle", "UNLIKELY", None, 64, 64, "similarity"),
        ("success", "a red circle", "UNLIKELY", 0.35, 63, 640, "image_size"),
        ("success", "a red circle", "UNLIKELY", 0.35, 300, 100, "aspect_ratio"),
        ("success", "a red circle", "UNLIKELY", 0.35, None, None, None),  # declared size unknown: decided later
        (None, "a red circle", "UNLIKELY", 0.35, 64, 64, "status"),
    ]
    table = pa.table(
        {
            name: [r[i] for r in rows]
            for i, name in enumerate(["status", "caption", "nsfw", "similarity", "width", "height"])
        }
    )
    roles = {name: table[name].combine_chunks() for name in table.column_names}
    roles["caption"] = normalise_captions(roles["caption"])
    assert list(metadata_reasons(roles, RULES, len(rows))) == [r[-1] for r in rows]

    # A rule whose column the data lacks is skipped, and a rule set to None is off.
    del roles["nsfw"]
    off = Filters(**{**RULES.__dict__, "min_similarity": None})
    assert list(metadata_reasons(roles, off, len(rows)))[6:9] == [None, None, None]


def test_captions_are_normalised_by_whitespace_only():
    captions = pa.array(["  A  red\tcircle \n", None, "Über  Café"])
    assert normalise_captions(captions).to_pylist() == ["A red circle", None, "Über Café"]


def test_probe_reads_the_size_and_rejects_what_is_not_a_complete_image():
    good = jpeg(80, 48)
    assert probe_image(good) == (80, 48)
    png = io.BytesIO()
    Image.new("RGB", (7, 9)).save(png, "PNG")
    assert probe_image(png.getvalue()) == (7, 9)
    assert probe_image(b"<!DOCTYPE html><html>Access denied</html>") is None
    assert probe_image(None) is None
    truncated = good[: len(good) // 2]
    assert probe_image(truncated) is None
    assert probe_image(truncated, full=False) == (80, 48)  # the header alone cannot tell


def test_later_duplicates_keep_the_first_row_in_input_order_whatever_the_partition_order():
    keys = pa.table(
        {
            "unit": pa.array([3, 0, 1, 0, 2, 1], pa.int32()),
            "row": pa.array([0, 7, 2, 9, 5, 1], pa.int64()),
            "url_key": url_keys(pa.array(["u1", "u1", "u1", "u2", None, "u2"])),
            "image_key": image_keys(pa.array([hashlib.sha256(b"x").hexdigest(), None, "not-a-hash", None, None, None])),
        }
    )
    tagged = dedup_keys(keys, {"url_key": "duplicate_url", "image_key": "duplicate_image"})
    assert len(tagged) == 5 + 1  # five URLs, one valid hash; no key never matches anything
    found = sorted(
        later_duplicates(tagged.take(np.random.default_rng(1).permutation(len(tagged)))).to_pylist(),
        key=lambda r: (r["unit"], r["row"]),
    )
    # u1 first appears at (unit 0, row 7), u2 at (0, 9): the later rows are the duplicates.
    assert [(r["unit"], r["row"], r["reason"]) for r in found] == [
        (1, 1, "duplicate_url"),
        (1, 2, "duplicate_url"),
        (3, 0, "duplicate_url"),
    ]


def test_part_writer_bounds_rows_and_bytes_per_file(tmp_path):
    storage = Storage(root=str(tmp_path))
    table = pa.table({"x": np.arange(250), "blob": [b"y" * 1000] * 250})
    by_rows = PartWriter(storage, str(tmp_path / "rows"), "part-00001", max_rows=100, max_bytes=1 << 30)
    by_rows.write(table.slice(0, 30))
    by_rows.write(table.slice(30))
    files = by_rows.close()
    assert sorted(files) == ["part-00001-0000.parquet", "part-00001-0001.parquet", "part-00001-0002.parquet"]
    assert [pq.read_metadata(tmp_path / "rows" / f).num_rows for f in sorted(files)] == [100, 100, 50]
    assert all((tmp_path / "rows" / f).stat().st_size == size for f, size in files.items())

    by_bytes = PartWriter(storage, str(tmp_path / "bytes"), "p", max_rows=10**6, max_bytes=60_000)
    by_bytes.write(table)
    sizes = [pq.read_metadata(tmp_path / "bytes" / f).num_rows for f in sorted(by_bytes.close())]
    assert sum(sizes) == 250 and max(sizes) <= 60 and len(sizes) == 5


@pytest.mark.parametrize("where", ["local", "s3"])
def test_trained_tokenizer_round_trips_through_storage_and_pads_to_fixed_length(where, tmp_path, request):
    if where == "s3":
        storage = Storage(root=f"s3://{BUCKET}/tok", endpoint_url=request.getfixturevalue("s3_server"))
    else:
        storage = Storage(root=str(tmp_path))
    captions = ["a red circle in the top left on a blue background", "an orange square in the bottom right"] * 5
    tokenizer = train_wordpiece(captions, vocab_size=500, max_length=12)
    url = storage.url("tokenizer")
    assert "tokenizer_config.json" in save_tokenizer(tokenizer, storage, url)
    loaded = load_tokenizer(url, storage)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    ids, mask = tokenize(loaded, ["A red  circle", captions[0] * 3], max_length=12)
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == np.int32 and mask.dtype == np.int8
    assert loaded.decode(ids[0], skip_special_tokens=True) == "a red circle"
    assert (mask == (ids != loaded.pad_token_id)).all() and mask[1].all()  # the long one is truncated, not dropped
    assert ids[1, -1] == loaded.sep_token_id


def write_unit(path, rows) -> Unit:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return Unit(0, str(path), str(path))


def test_one_file_through_prepare_unit_counts_every_row_once(tmp_path):
    storage = Storage(root=str(tmp_path))
    image = jpeg()
    rows = [
        {"key": "k0", "url": "u0", "caption": "a red circle", "status": "success", "jpg": image},
        {
            "key": "k1",
            "url": "u1",
            "caption": "a red circle a red circle a red circle",
            "status": "success",
            "jpg": jpeg(65),
        },
        {"key": "k2", "url": "u2", "caption": "a green square", "status": "success", "jpg": image[:300]},
        {"key": "k3", "url": "u3", "caption": "a blue triangle", "status": "failed_to_download", "jpg": None},
        {"key": "k4", "url": "u4", "caption": "a blue triangle", "status": "success", "jpg": jpeg(64, 20)},
        {"key": "k5", "url": "u5", "caption": "a blue circle", "status": "success", "jpg": jpeg(64, 70)},
    ]
    unit = write_unit(tmp_path / "00000.parquet", rows)
    columns = Columns(url="url", caption="caption", status="status", key="key", image="jpg")
    rules = Filters(
        min_width=64, min_height=64, max_aspect_ratio=2.0, caption_max_tokens=8, caption_denylist=("green",)
    )
    scanned = pa.concat_tables(scan_unit(storage, unit, "parquet", columns, rules, batch_rows=4))
    assert scanned["reason"].to_pylist() == [None, None, "caption_denylist", "status", None, None]

    tokenizer = train_wordpiece([r["caption"] for r in rows], vocab_size=200, max_length=10, min_frequency=1)
    kept = PartWriter(storage, str(tmp_path / "out"), "part", 100, 1 << 30)
    dropped = PartWriter(storage, str(tmp_path / "dropped"), "part", 100, 1 << 30)
    summary = prepare_unit(
        storage, unit, "parquet", columns, rules, {5: "duplicate_image"}, tokenizer, 10, kept, dropped, batch_rows=4
    )
    assert summary["rows_in"] == 6 and summary["rows_out"] == 1
    assert summary["dropped"] == {
        "caption_tokens": 1,
        "caption_denylist": 1,
        "status": 1,
        "image_size": 1,
        "duplicate_image": 1,
    }
    out = pq.read_table(tmp_path / "out").to_pylist()
    assert [(r["key"], r["width"], r["height"]) for r in out] == [("k0", 64, 64)]
    assert out[0]["image"] == image and out[0]["sha256"] == hashlib.sha256(image).hexdigest()
    reasons = {r["key"]: r["reason"] for r in pq.read_table(tmp_path / "dropped").to_pylist()}
    assert reasons == {
        "k1": "caption_tokens",
        "k2": "caption_denylist",
        "k3": "status",
        "k4": "image_size",
        "k5": "duplicate_image",
    }


def test_inputs_are_listed_in_order_and_a_missing_column_names_file_and_column(tmp_path):
    storage = Storage(root=str(tmp_path))
    for name in ("b.parquet", "a.parquet"):
        write_unit(tmp_path / name, [{"URL": "u", "TEXT": "t"}])
    (tmp_path / "_stats.parquet").write_bytes(b"")
    units, listing = list_units(storage, str(tmp_path), "metadata")
    assert [u.name for u in units] == ["a.parquet", "b.parquet"] and [u.index for u in units] == [0, 1]
    assert list_units(storage, str(tmp_path / "a.parquet"), "metadata")[0][0].name == "a.parquet"
    write_unit(tmp_path / "b.parquet", [{"URL": "u", "TEXT": "longer"}])
    assert list_units(storage, str(tmp_path), "metadata")[1] != listing  # the input changed

    with pytest.raises(MissingColumnError) as error:
        check_columns(storage, units[0], Columns(url="URL", caption="caption", similarity="similarity"), "metadata")
    message = str(error.value)
    assert str(tmp_path / "a.parquet") in message and "'caption' (data.input.caption_col)" in message
    assert "'similarity' (data.input.similarity_col)" in message and "['URL', 'TEXT']" in message

    with pytest.raises(FileNotFoundError, match=f"data.input.url={tmp_path}/nope"):
        list_units(storage, str(tmp_path / "nope"), "metadata")
    with pytest.raises(FileNotFoundError, match=r"no \*.tar files"):
        list_units(storage, str(tmp_path), "webdataset")


def webdataset_shard(tmp_path, rows=20):
    """One img2dataset webdataset shard (tar + sibling parquet) of clean synthetic rows."""
    planned = plan_rows(rows, 32, 0, {}, 0.15, rows_per_shard=rows)
    for name, payload in img2dataset_shard(planned, 90, ["webdataset"]).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(payload)
    return tmp_path / "webdataset"


WDS = Columns(url="url", caption="caption", status="status", sha256="sha256", key="key", image="jpg")


def prepare_cut_in_half(storage: Storage, unit: Unit, tmp_path) -> dict:
    """The unit's tar cut in half, as an interrupted copy leaves it, through prepare_unit."""
    whole = Path(unit.path).read_bytes()
    Path(unit.path).write_bytes(whole[: len(whole) // 2])
    tokenizer = train_wordpiece(["a red circle"], 50, 16)
    writers = [PartWriter(storage, str(tmp_path / name), "p", 100, 1 << 30) for name in ("out", "dropped")]
    return prepare_unit(
        storage,
        unit,
        "webdataset",
        WDS,
        Filters(min_width=32, min_height=32),
        {},
        tokenizer,
        16,
        *writers,
        batch_rows=8,
    )


def test_a_single_tar_is_an_input_and_a_tar_cut_short_costs_only_its_missing_images(tmp_path):
    storage = Storage(root=str(tmp_path))
    folder = webdataset_shard(tmp_path)
    [unit], _ = list_units(storage, str(folder / "00000.tar"), "webdataset")
    assert unit.metadata_path == str(folder / "00000.parquet")

    summary = prepare_cut_in_half(storage, unit, tmp_path)
    assert summary["rows_in"] == 20 and 0 < summary["rows_out"] < 20
    assert summary["dropped"] == {"undecodable": 20 - summary["rows_out"]}


def test_a_tar_alone_is_read_from_its_members_and_a_cut_costs_only_the_sample_it_cut(tmp_path):
    storage = Storage(root=str(tmp_path))
    folder = webdataset_shard(tmp_path)
    with_parquet = pq.read_table(folder / "00000.parquet").to_pylist()
    (folder / "00000.parquet").unlink()
    [unit], _ = list_units(storage, str(folder), "webdataset")
    assert unit.metadata_path is None
    wanted = replace(WDS, nsfw="NSFW", similarity="clip_score", optional=("nsfw", "similarity"))
    columns, absent = wanted.resolved(available_columns(storage, unit, wanted))  # the first sample's .json fields
    assert absent == {"similarity": "clip_score"} and columns.nsfw == "NSFW" and columns.similarity is None
    [table] = list(read_samples(storage, unit, "webdataset", columns, batch_rows=100))
    assert set(table["NSFW"].to_pylist()) == {"UNLIKELY"}
    assert table["key"].to_pylist() == [r["key"] for r in with_parquet]  # the tar's order
    assert table["caption"].to_pylist() == [r["caption"] for r in with_parquet]  # from the .txt members
    assert table["sha256"].to_pylist() == [hashlib.sha256(b).hexdigest() for b in table[IMAGE].to_pylist()]
    assert table[ROW].to_pylist() == list(range(20))

    summary = prepare_cut_in_half(storage, unit, tmp_path)
    # The samples before the cut are kept; the one being read when the tar ended is dropped (its .json was not
    # reached, so its first failing rule is the unknown status), the ones after it were never seen.
    assert 0 < summary["rows_out"] < 20 and summary["rows_in"] == summary["rows_out"] + 1
    assert summary["dropped"] == {"status": 1}

    (folder / "00000.tar").write_bytes(b"not a tar at all")
    with pytest.raises(UnreadableInputError, match=r"00000\.tar: no sample could be read from it as a tar"):
        checked(storage, unit, WDS, "webdataset")


def test_optional_columns_the_data_lacks_are_resolved_away_and_required_ones_stay_errors(tmp_path):
    storage = Storage(root=str(tmp_path))
    image = jpeg()
    rows = [
        {"caption": "a red circle", "image": {"bytes": image, "path": "0.jpg"}},
        {"caption": "a blue square", "image": {"bytes": jpeg(70), "path": "1.jpg"}},
    ]
    unit = write_unit(tmp_path / "train-0.parquet", rows)
    wanted = Columns(
        url="url",
        caption="caption",
        similarity="similarity",
        key="key",
        image="image",
        optional=("url", "similarity", "key"),
    )
    columns, absent = wanted.resolved(available_columns(storage, unit, wanted))
    assert absent == {"url": "url", "similarity": "similarity", "key": "key"}
    assert unused_rules("parquet", columns, Filters(min_similarity=0.3), absent) == {
        "status": "no status column",  # not configured for this data at all
        "similarity": "no 'similarity' column in the data",
        "duplicate_url": "no 'url' column in the data",
    }
    [table] = list(read_samples(storage, unit, "parquet", columns, batch_rows=10))
    assert table[IMAGE].to_pylist() == [image, jpeg(70)]  # the hub's {bytes, path} images
    assert table[KEY].to_pylist() == ["train-0-0", "train-0-1"]  # keys made from the file name and row
    with pytest.raises(MissingColumnError, match=r"'similarity' \(data.input.similarity_col\)"):
        check_columns(storage, unit, replace(wanted, optional=()), "parquet")


def test_a_metadata_file_splits_into_units_of_whole_row_groups_with_rows_numbered_in_the_file(tmp_path):
    storage = Storage(root=str(tmp_path))
    table = pa.table({"URL": [f"u{i}" for i in range(250)], "TEXT": ["a red circle"] * 250})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=40)  # 7 row groups
    units, _ = list_units(storage, str(tmp_path), "metadata", rows_per_unit=100)
    assert [(u.row_groups, u.first_row) for u in units] == [((0, 3), 0), ((3, 6), 120), ((6, 7), 240)]
    assert [u.index for u in units] == [0, 1, 2] and {u.path for u in units} == {str(tmp_path / "big.parquet")}
    columns = Columns(url="URL", caption="TEXT")
    read = [t for u in units for t in read_metadata(storage, u, "metadata", columns, batch_rows=32)]
    assert pa.concat_tables(read)[ROW].to_pylist() == list(range(250))
    assert pa.concat_tables(read)["URL"].to_pylist() == table["URL"].to_pylist()
    assert len(list_units(storage, str(tmp_path), "metadata", rows_per_unit=1000)[0]) == 1


def test_image_digests_come_from_the_bytes_when_the_data_has_no_sha256_column(tmp_path):
    storage = Storage(root=str(tmp_path))
    image, other = jpeg(), jpeg(70)
    rows = [
        {"key": f"k{i}", "url": f"u{i}", "caption": "a red circle", "jpg": b}
        for i, b in enumerate([image, other, image])
    ]
    unit = write_unit(tmp_path / "00000.parquet", rows)
    columns = Columns(url="url", caption="caption", key="key", image="jpg")
    [scanned] = list(scan_unit(storage, unit, "parquet", columns, Filters(), batch_rows=10))
    digests = scanned["image_key"].to_pylist()
    assert digests[0] == hashlib.sha256(image).digest()[:16] == digests[2] != digests[1]
    keys = dedup_keys(
        scanned.drop_columns(["reason", "caption"]), {"sample_key": "duplicate_key", "image_key": "duplicate_image"}
    )
    assert [(r["row"], r["reason"]) for r in later_duplicates(keys).to_pylist()] == [(2, "duplicate_image")]


def test_every_file_is_checked_for_its_columns_not_just_the_first(tmp_path):
    storage = Storage(root=str(tmp_path))
    write_unit(tmp_path / "a.parquet", [{"URL": "u", "TEXT": "a red circle", "similarity": 0.4}])
    write_unit(tmp_path / "b.parquet", [{"URL": "v", "TEXT": "a red circle"}])
    units, _ = list_units(storage, str(tmp_path), "metadata")
    columns = Columns(url="URL", caption="TEXT", similarity="similarity")
    assert len(pa.concat_tables(scan_unit(storage, units[0], "metadata", columns, RULES, 10))) == 1
    with pytest.raises(MissingColumnError, match=r"b\.parquet: missing column 'similarity'"):
        list(scan_unit(storage, units[1], "metadata", columns, RULES, 10))
    (tmp_path / "c.parquet").write_bytes(b"")
    with pytest.raises(UnreadableInputError, match=r"c\.parquet: cannot be read as parquet"):
        list(scan_unit(storage, list_units(storage, str(tmp_path), "metadata")[0][2], "metadata", columns, RULES, 10))


def test_captions_that_are_not_utf8_are_kept_readable_and_a_bad_pattern_is_refused_up_front():
    broken = pa.array([b"caf\xe9 au lait", None, b"fine"], pa.binary()).view(pa.string())  # parquet does not check
    assert normalise_captions(broken).to_pylist() == ["caf\ufffd au lait", None, "fine"]
    assert url_keys(broken)[0].as_py() is not None
    with pytest.raises(ValueError, match=r"caption_denylist: '\(\?!x\)' is not an RE2 regex"):
        Filters.from_config({"caption_denylist": ["(?!x)"]})
