"""A LAION-400M-format corpus: metadata parquet plus img2dataset-layout image shards, with LAION's bad rows.

Planning (which row shows what, which rows are bad and how) is cheap and happens in one place; rendering and
writing a shard is a pure function of its planned rows, so shards can be written in parallel and re-written
identically. Each bad row carries exactly one defect, recorded in the truth table, so that a filter can be
checked reason by reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ldm.synthetic.render import encode_jpeg, object_box, render
from ldm.synthetic.scene import Scene, all_scenes, caption, class_name, held_out_combinations

# Bump when the generator's output changes for the same config, so old corpora are not mistaken for new ones.
# 4: img2dataset's metadata carries each image's class and layout (label, boxes).
GENERATOR_VERSION = 4

# The defects real LAION / img2dataset data has; each bad row gets exactly one.
DEFECTS = (
    "undecodable",  # bytes that are not an image (an HTML error page served as .jpg)
    "truncated",  # a JPEG cut off mid-stream
    "null_caption",
    "empty_caption",
    "nsfw",  # NSFW == "NSFW"
    "unsure",  # NSFW == "UNSURE"
    "low_similarity",  # CLIP similarity below LAION-400M's 0.3
    "tiny",  # a few pixels on a side
    "extreme_aspect",  # 4:1 banners
    "duplicate_url",  # the URL of an earlier row
    "duplicate_image",  # the exact bytes of an earlier row's image
    "long_caption",  # SEO spam appended to a real caption
    "failed_download",  # img2dataset status != "success"
)

# LAION-400M metadata, as distributed.
LAION_SCHEMA = pa.schema(
    [
        ("SAMPLE_ID", pa.int64()),
        ("URL", pa.string()),
        ("TEXT", pa.string()),
        ("HEIGHT", pa.int64()),
        ("WIDTH", pa.int64()),
        ("LICENSE", pa.string()),
        ("NSFW", pa.string()),
        ("similarity", pa.float64()),
    ]
)

# img2dataset's per-sample metadata with --save_additional_columns '["NSFW","similarity","LICENSE","label","boxes"]'
# --compute_hash sha256, in its column order (additional columns, caption, url, then the downloader's). label
# and boxes are what a class-conditional or layout-to-image dataset adds: the object's class ("red circle"),
# and its layout as JSON, [{"label": class, "box": [x0, y0, x1, y1]}] with coordinates in [0, 1] of the image.
IMG2DATASET_META_SCHEMA = pa.schema(
    [
        ("NSFW", pa.string()),
        ("similarity", pa.float64()),
        ("LICENSE", pa.string()),
        ("label", pa.string()),
        ("boxes", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
    ]
)
# output_format=parquet adds the image bytes (the caption stays in `caption`).
IMG2DATASET_PARQUET_SCHEMA = IMG2DATASET_META_SCHEMA.append(pa.field("jpg", pa.binary()))

TRUTH_SCHEMA = pa.schema(
    [
        ("SAMPLE_ID", pa.int64()),
        ("key", pa.string()),
        ("defect", pa.string()),
        ("colour", pa.string()),
        ("shape", pa.string()),
        ("position", pa.string()),
        ("background", pa.string()),
    ]
)

LICENSES = ("?", "by-nc-sa", None)  # LAION-400M's LICENSE is mostly "?", sometimes null
MISSING_SIZE_FRACTION = 0.02  # LAION metadata has nulls beyond TEXT and LICENSE; these rows stay clean
SCENE_FIELDS = ("colour", "shape", "position", "background")
DOWNLOAD_ERROR = "HTTP Error 404: Not Found"
SPAM = "free shipping best price buy now cheap sale discount wholesale original new hot 2021 high quality"


def plan_rows(
    num_samples: int,
    resolution: int,
    seed: int,
    bad_rows: Mapping[str, float],
    holdout_fraction: float,
    rows_per_shard: int,
    image_host: str = "https://images.synthetic.example",
) -> list[dict[str, Any]]:
    """Every row of the corpus: its LAION metadata, what its image shows, its defect (or None), its shard.
    ``image_host``: where the rows' URLs point (a test serves the images from one)."""
    unknown = sorted(set(bad_rows) - set(DEFECTS))
    if unknown:
        raise ValueError(f"unknown defect(s) {unknown} in bad_rows; known: {list(DEFECTS)}")
    if not 0 < rows_per_shard <= 10_000:
        raise ValueError(f"rows_per_shard must be in 1..10000, got {rows_per_shard}")
    rng = np.random.default_rng([seed, 0])
    held_out = held_out_combinations(holdout_fraction, seed)
    scenes = [s for s in all_scenes() if (s.colour, s.shape, s.background) not in held_out]

    defect_of: dict[int, str] = {}
    counts = {d: int(round(float(f) * num_samples)) for d, f in bad_rows.items() if f}
    if sum(counts.values()) > num_samples // 2:
        raise ValueError(f"bad_rows ask for {sum(counts.values())} bad rows out of {num_samples}; at most half")
    # Duplicates come from the second half so an earlier clean row always exists to copy.
    order = list(rng.permutation(np.arange(num_samples // 2, num_samples)))
    order += list(rng.permutation(np.arange(0, num_samples // 2)))
    for defect in sorted(counts, key=lambda d: not d.startswith("duplicate")):
        for _ in range(counts[defect]):
            defect_of[int(order.pop(0))] = defect
    clean_before = np.array(sorted(set(range(num_samples)) - set(defect_of)))

    digits = key_digits(rows_per_shard)
    rows = []
    for i in range(num_samples):
        scene = scenes[int(rng.integers(len(scenes)))]
        defect = defect_of.get(i)
        row = {
            "SAMPLE_ID": i,
            "URL": f"{image_host.rstrip('/')}/{seed}/{i:08d}.jpg",
            "TEXT": caption(scene, int(rng.integers(3))),
            "size": (resolution, resolution),  # the pixels served; WIDTH/HEIGHT declare it below
            "LICENSE": LICENSES[int(rng.choice(len(LICENSES), p=[0.9, 0.05, 0.05]))],
            "NSFW": "UNLIKELY",
            "similarity": float(rng.uniform(0.3, 0.45)),
            "render_seed": int(rng.integers(2**31)),
            **scene.as_dict(),
            "defect": defect,
            "shard": i // rows_per_shard,
            "key": f"{i // rows_per_shard:05d}{i % rows_per_shard:0{digits}d}",
        }
        _inject(row, defect, rows, clean_before, rng, resolution)
        missing = defect is None and rng.random() < MISSING_SIZE_FRACTION  # declared size unknown, bytes fine
        row["WIDTH"], row["HEIGHT"] = (None, None) if missing else row["size"]
        rows.append(row)
    return rows


def key_digits(rows_per_shard: int) -> int:
    """img2dataset's sample-index width: ceil(log10(number_sample_per_shard)) digits."""
    return max(1, math.ceil(math.log10(rows_per_shard)))


def _inject(row, defect, earlier, clean, rng, resolution) -> None:
    if defect in ("duplicate_url", "duplicate_image"):
        source = earlier[int(rng.choice(clean[clean < row["SAMPLE_ID"]]))]
        if defect == "duplicate_url":
            # Same address, re-crawled: other caption, other bytes, so only the URL repeats.
            row["URL"] = source["URL"]
        else:
            for field in ("TEXT", "size", "render_seed", *SCENE_FIELDS):
                row[field] = source[field]
    elif defect == "null_caption":
        row["TEXT"] = None
    elif defect == "empty_caption":
        row["TEXT"] = str(rng.choice(["", " ", "  \t"]))
    elif defect == "nsfw":
        row["NSFW"] = "NSFW"
    elif defect == "unsure":
        row["NSFW"] = "UNSURE"
    elif defect == "low_similarity":
        row["similarity"] = float(rng.uniform(0.05, 0.25))
    elif defect == "tiny":
        side = int(rng.integers(max(4, resolution // 8), max(5, resolution // 4) + 1))
        row["size"] = (side, side)
    elif defect == "extreme_aspect":
        long_side = resolution * 4
        row["size"] = (long_side, resolution) if rng.random() < 0.5 else (resolution, long_side)
    elif defect == "long_caption":
        words = SPAM.split()
        spam = " ".join(words[int(j)] for j in rng.integers(len(words), size=int(rng.integers(120, 200))))
        row["TEXT"] = f"{row['TEXT']} {spam}"


def image_bytes(row: Mapping[str, Any], jpeg_quality: int) -> bytes | None:
    """What a download of the row's URL returns (None when the download fails)."""
    defect = row["defect"]
    if defect == "failed_download":
        return None
    if defect == "undecodable":
        return b"<!DOCTYPE html><html><body>Access denied</body></html>" + bytes(
            row["render_seed"] % 251 for _ in range(64)
        )
    width, height = row["size"]
    pixels = render(scene_of(row), width, height, row["render_seed"])
    data = encode_jpeg(pixels, jpeg_quality)
    if defect == "truncated":
        return data[: len(data) // 2]
    return data


def laion_metadata_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{f: r[f] for f in LAION_SCHEMA.names} for r in rows], schema=LAION_SCHEMA)


def truth_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(
        [{f: r[f] for f in TRUTH_SCHEMA.names} for r in rows],
        schema=TRUTH_SCHEMA,
    )


def img2dataset_shard(rows: list[Mapping[str, Any]], jpeg_quality: int, formats: Iterable[str]) -> dict[str, bytes]:
    """The files img2dataset writes for one shard, by name relative to the output folder of each format."""
    start = time.time()
    metas, images = [], []
    for row in rows:
        data = image_bytes(row, jpeg_quality)
        success = data is not None
        metas.append(
            {
                "NSFW": row["NSFW"],
                "similarity": row["similarity"],
                "LICENSE": row["LICENSE"],
                "label": class_name(scene_of(row)),
                "boxes": layout(row),
                "caption": row["TEXT"],
                "url": row["URL"],
                "key": row["key"],
                "status": "success" if success else "failed_to_download",
                "error_message": None if success else DOWNLOAD_ERROR,
                # --resize_mode no --disable_all_reencoding True: the bytes are kept exactly as served and
                # never decoded, so img2dataset knows no sizes (and cannot tell undecodable bytes).
                "width": None,
                "height": None,
                "original_width": None,
                "original_height": None,
                "sha256": hashlib.sha256(data).hexdigest() if success else None,
            }
        )
        images.append(data)
    end = time.time()

    shard = f"{rows[0]['shard']:05d}"
    status = Counter(m["status"] if m["error_message"] is None else m["error_message"] for m in metas)
    stats = {
        "count": len(metas),
        "successes": sum(m["status"] == "success" for m in metas),
        "failed_to_download": sum(m["status"] == "failed_to_download" for m in metas),
        "failed_to_resize": 0,
        "duration": end - start,
        "start_time": start,
        "end_time": end,
        "status_dict": dict(status),
    }
    stats_json = json.dumps(stats, indent=4).encode()
    files: dict[str, bytes] = {}
    formats = set(formats)
    if "webdataset" in formats:
        files[f"webdataset/{shard}.tar"] = _tar(metas, images)
        files[f"webdataset/{shard}.parquet"] = _parquet(pa.Table.from_pylist(metas, schema=IMG2DATASET_META_SCHEMA))
        files[f"webdataset/{shard}_stats.json"] = stats_json
    if "parquet" in formats:
        records = [{**m, "jpg": img} for m, img in zip(metas, images)]
        files[f"parquet/{shard}.parquet"] = _parquet(pa.Table.from_pylist(records, schema=IMG2DATASET_PARQUET_SCHEMA))
        files[f"parquet/{shard}_stats.json"] = stats_json
    unknown = formats - {"webdataset", "parquet"}
    if unknown:
        raise ValueError(f"unknown img2dataset output format(s) {sorted(unknown)}; known: webdataset, parquet")
    return files


def _tar(metas: list[dict[str, Any]], images: list[bytes | None]) -> bytes:
    """A webdataset tar: <key>.jpg, <key>.txt, <key>.json per successful download, as img2dataset writes it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for meta, image in zip(metas, images):
            if image is None:
                continue
            text = str(meta["caption"]) if meta["caption"] is not None else ""
            for ext, payload in (("jpg", image), ("txt", text.encode()), ("json", json.dumps(meta, indent=4).encode())):
                info = tarfile.TarInfo(f"{meta['key']}.{ext}")
                info.size, info.mode, info.mtime = len(payload), 0o444, 0
                tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def layout(row: Mapping[str, Any]) -> str:
    """The row's object box as JSON: [{"label": its class, "box": [x0, y0, x1, y1]}], relative to the image."""
    width, height = row["size"]
    x0, y0, x1, y1 = object_box(scene_of(row), width, height, row["render_seed"])
    box = [round(x0 / width, 4), round(y0 / height, 4), round(x1 / width, 4), round(y1 / height, 4)]
    return json.dumps([{"label": class_name(scene_of(row)), "box": box}])


def scene_of(row: Mapping[str, Any]) -> Scene:
    return Scene(**{f: row[f] for f in SCENE_FIELDS})
