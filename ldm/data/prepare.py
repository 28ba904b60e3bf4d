"""One input unit (file) through the filters: the two per-unit steps of stage=prepare.

``scan_unit`` reads only metadata columns and yields, per row, its first failing metadata rule and its
deduplication keys: the cheap pass whose keys are shuffled to find duplicates across the whole input, and
whose captions train the tokenizer. ``prepare_unit`` then reads the unit in full, applies every rule (the
duplicates found globally, token counts, image decoding) and writes the kept rows. Both stream in bounded
batches, so memory follows the batch size, not the input size.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ldm.data.filters import (
    Filters,
    image_keys,
    metadata_reasons,
    normalise_captions,
    probe_image,
    sha256_hex,
    size_reasons,
    url_keys,
)
from ldm.data.parts import PartWriter
from ldm.data.sources import IMAGE, KEY, ROW, Columns, Unit, checked, read_metadata, read_samples
from ldm.storage import Storage

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Bump when prepare's output changes for the same config and input.
# 2: the held-out rows are written apart (held_out/), not mixed into the training shards.
# 3: the manifest lists each data file's row groups (training plans its epochs from them).
# 4: label and boxes columns (an image's class and layout, null when the data has none).
PREPARE_VERSION = 4


@dataclass(frozen=True)
class HeldOut:
    """The rows no training stage sees, chosen once by key: a salted hash of the key below ``fraction``, the
    same in every run, on every worker and for every stage. ``key in held_out``."""

    fraction: float
    salt: str

    def __contains__(self, key: str) -> bool:
        digest = hashlib.sha1(f"{self.salt}\0{key}".encode()).hexdigest()
        return int(digest[:8], 16) < self.fraction * 2**32


SCAN_SCHEMA = pa.schema(
    [
        ("unit", pa.int32()),
        ("row", pa.int64()),
        ("reason", pa.string()),
        ("caption", pa.string()),
        ("sample_key", pa.binary(16)),
        ("url_key", pa.binary(16)),
        ("image_key", pa.binary(16)),
    ]
)


# Every dropped row, so that "why is this row not in the output" has an answer row by row.
DROPPED_SCHEMA = pa.schema(
    [("row", pa.int64()), ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("reason", pa.string())]
)


def prepared_schema(max_length: int) -> pa.Schema:
    """The prepared-shard contract every later stage reads (key, caption, tokens, the original image bytes,
    size, similarity, sha256; the class label and layout boxes where the data has them), plus the source URL
    for attribution."""
    return pa.schema(
        [
            ("key", pa.string()),
            ("caption", pa.string()),
            ("input_ids", pa.list_(pa.int32(), max_length)),
            ("attention_mask", pa.list_(pa.int8(), max_length)),
            ("image", pa.binary()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("similarity", pa.float64()),
            ("sha256", pa.string()),
            ("url", pa.string()),
            ("label", pa.string()),
            ("boxes", pa.string()),
        ]
    )


def unused_rules(
    fmt: str, columns: Columns, filters: Filters, absent: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Configured rules this input cannot apply, and why: recorded so that "0 dropped" is never ambiguous.
    ``absent``: optional roles (``Columns.resolved``) whose column the data turned out not to have."""
    absent = absent or {}

    def why(role: str, default: str) -> str:
        return f"no {absent[role]!r} column in the data" if role in absent else default

    missing = {
        "status": (filters.status is not None, "status", "no status column"),
        "nsfw": (filters.nsfw_allowed is not None, "nsfw", "no NSFW column"),
        "similarity": (filters.min_similarity is not None, "similarity", "no similarity column"),
        "duplicate_url": (filters.dedup_urls, "url", "no URL column"),
    }
    unused = {
        rule: why(role, text) for rule, (on, role, text) in missing.items() if on and getattr(columns, role) is None
    }
    if fmt == "metadata":
        unused["duplicate_key"] = "metadata rows have no sample key"
        if filters.dedup_images:
            unused["duplicate_image"] = "metadata has no image bytes"
        unused["undecodable"] = "metadata has no image bytes"
        if columns.width is None or columns.height is None:
            unused["image_size"] = unused["aspect_ratio"] = why(
                "width" if "width" in absent else "height", "no declared WIDTH/HEIGHT columns"
            )
    return unused


def scan_unit(
    storage: Storage, unit: Unit, fmt: str, columns: Columns, filters: Filters, batch_rows: int
) -> Iterator[pa.Table]:
    """Per row of ``unit``: its first failing metadata rule, normalised caption and deduplication keys."""
    checked(storage, unit, columns, fmt)  # every file: a column missing from one of them is an error, not a skip
    hash_bytes = fmt != "metadata" and filters.dedup_images and columns.sha256 is None
    batches = (
        read_samples(storage, unit, fmt, columns, batch_rows)
        if hash_bytes
        else read_metadata(storage, unit, fmt, columns, batch_rows)
    )
    for table in batches:
        roles = _roles(table, columns)
        nulls = pa.nulls(len(table), pa.binary(16))
        if hash_bytes:
            image_key = image_keys(sha256_hex(table[IMAGE].to_pylist()))
        else:
            image_key = image_keys(roles["sha256"]) if filters.dedup_images and "sha256" in roles else nulls
        yield pa.Table.from_arrays(
            [
                pa.array(np.full(len(table), unit.index, np.int32)),
                table[ROW],
                pa.array(metadata_reasons(roles, filters, len(table)), pa.string()),
                roles["caption"],
                url_keys(roles["key"]) if fmt != "metadata" else nulls,
                url_keys(roles["url"]) if filters.dedup_urls and "url" in roles else nulls,
                image_key,
            ],
            schema=SCAN_SCHEMA,
        )


def prepare_unit(
    storage: Storage,
    unit: Unit,
    fmt: str,
    columns: Columns,
    filters: Filters,
    duplicates: Mapping[int, str],
    tokenizer: PreTrainedTokenizerBase | None,
    max_length: int,
    writer: PartWriter,
    dropped_writer: PartWriter,
    batch_rows: int,
    held_out: HeldOut | None = None,
    held_out_writer: PartWriter | None = None,
) -> dict[str, Any]:
    """Filter ``unit`` (``duplicates``: row -> reason, found across the whole input) and write what it keeps
    (prepared shards for image formats, the input's own columns for metadata) with ``writer``, except the kept
    rows ``held_out`` holds, which go to ``held_out_writer``, and each dropped row with its reason with
    ``dropped_writer``. Returns the unit's counts."""
    if filters.counts_tokens and tokenizer is None:
        raise ValueError("caption token bounds need a tokenizer")
    checked(storage, unit, columns, fmt)
    dropped: Counter[str] = Counter()
    rows_in = 0
    for table in read_samples(storage, unit, fmt, columns, batch_rows):
        rows_in += len(table)
        roles = _roles(table, columns)
        reasons = metadata_reasons(roles, filters, len(table))
        pending = reasons == None  # noqa: E711 (elementwise)
        rows = table[ROW].to_numpy()
        reasons[pending] = [duplicates.get(int(r)) for r in rows[pending]]
        captions = pc.fill_null(roles["caption"], "").to_pylist()
        if filters.counts_tokens:
            # Imported here: transformers brings torch, which workers that tokenize nothing never need.
            from ldm.text.tokenizer import token_counts

            pending = np.flatnonzero(reasons == None)  # noqa: E711
            counts = token_counts(tokenizer, [captions[i] for i in pending])
            low, high = filters.caption_min_tokens, filters.caption_max_tokens
            outside = ((counts < low) if low is not None else False) | ((counts > high) if high is not None else False)
            reasons[pending[np.asarray(outside, dtype=bool)]] = "caption_tokens"
        if fmt == "metadata":
            keep = np.flatnonzero(reasons == None)  # noqa: E711
            out = table.drop_columns([ROW]).take(pa.array(keep, pa.int64()))
        else:
            out = _prepared_rows(table, roles, captions, reasons, filters, tokenizer, max_length)
        dropped.update(r for r in reasons if r is not None)
        if held_out is not None and len(out):
            held = pa.array([key in held_out for key in out["key"].to_pylist()], pa.bool_())
            held_out_writer.write(out.filter(held))
            out = out.filter(pc.invert(held))
        if len(out):
            writer.write(out)
        if len(out) < len(table):
            dropped_writer.write(_dropped_rows(table, roles, reasons))
    files = writer.close()
    held_files = held_out_writer.close() if held_out_writer is not None else {}
    held_rows = held_out_writer.rows if held_out_writer is not None else 0
    rows_out = writer.rows + held_rows
    if rows_in != rows_out + sum(dropped.values()):
        raise AssertionError(f"{unit.path}: {rows_in} rows in, {rows_out} out, {sum(dropped.values())} dropped")
    return {
        "unit": unit.index,
        "path": unit.path,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "held_out": held_rows,
        "dropped": dict(dropped),
        "files": files,
        "held_out_files": held_files,
        "row_groups": writer.row_groups,
        "held_out_row_groups": held_out_writer.row_groups if held_out_writer is not None else {},
        "dropped_files": dropped_writer.close(),
    }


def _dropped_rows(table: pa.Table, roles: Mapping[str, pa.Array], reasons: np.ndarray) -> pa.Table:
    index = pa.array(np.flatnonzero(reasons != None), pa.int64())  # noqa: E711 (elementwise)
    n = len(index)

    def role(name: str) -> pa.Array:
        return pc.cast(roles[name].take(index), pa.string()) if name in roles else pa.nulls(n, pa.string())

    return pa.Table.from_arrays(
        [
            table[ROW].take(index),
            role("key"),
            role("url"),
            role("caption"),
            pa.array(reasons[index.to_numpy()], pa.string()),
        ],
        schema=DROPPED_SCHEMA,
    )


def _prepared_rows(table, roles, captions, reasons, filters, tokenizer, max_length) -> pa.Table:
    """Decode-check the rows still pending (charging ``reasons`` in place) and build the kept ones."""
    from ldm.text.tokenizer import tokenize

    pending = np.flatnonzero(reasons == None)  # noqa: E711
    images = table[IMAGE].to_pylist()
    sizes = [probe_image(images[i], full=filters.verify_image_stream) for i in pending]
    undecodable = np.array([s is None for s in sizes], dtype=bool)
    reasons[pending[undecodable]] = "undecodable"
    width = np.array([s[0] if s else np.nan for s in sizes], dtype=np.float64)
    height = np.array([s[1] if s else np.nan for s in sizes], dtype=np.float64)
    size_fail = size_reasons(width, height, filters)
    decoded = ~undecodable
    reasons[pending[decoded]] = size_fail[decoded]
    keep_mask = decoded & (size_fail == None)  # noqa: E711
    keep = pending[keep_mask]
    kept_captions = [captions[i] for i in keep]
    ids, mask = (
        tokenize(tokenizer, kept_captions, max_length)
        if len(keep)
        else (
            np.zeros((0, max_length), np.int32),
            np.zeros((0, max_length), np.int8),
        )
    )
    take = pa.array(keep, pa.int64())
    kept_images = [images[i] for i in keep]
    n = len(keep)
    return pa.Table.from_arrays(
        [
            pc.cast(roles["key"].take(take), pa.string()),
            pa.array(kept_captions, pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1), pa.int32()), max_length),
            pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1), pa.int8()), max_length),
            pa.array(kept_images, pa.binary()),
            pa.array(width[keep_mask].astype(np.int32)),
            pa.array(height[keep_mask].astype(np.int32)),
            pc.cast(roles["similarity"].take(take), pa.float64())
            if "similarity" in roles
            else pa.nulls(n, pa.float64()),
            sha256_hex(kept_images),
            *(
                pc.cast(roles[role].take(take), pa.string()) if role in roles else pa.nulls(n, pa.string())
                for role in ("url", "label", "boxes")
            ),
        ],
        schema=prepared_schema(max_length),
    )


def _roles(table: pa.Table, columns: Columns) -> dict[str, pa.Array]:
    """The table's columns by role, the caption normalised."""
    roles = {
        role: table[name].combine_chunks()
        for role, name in columns.present().items()
        if role != "image" and name in table.column_names
    }
    if "key" not in roles and KEY in table.column_names:  # made from the file name and row
        roles["key"] = table[KEY].combine_chunks()
    roles["caption"] = normalise_captions(roles["caption"])
    return roles
