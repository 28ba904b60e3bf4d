"""The images of the kept metadata rows, downloaded with img2dataset's downloader one shard at a time.

img2dataset is the ecosystem's downloader (LAION-400M and -5B were fetched with it): its ``Downloader`` fetches
a shard's URLs on a thread pool, checks each image (decodes it, applies the size and aspect bounds, honours
``X-Robots-Tag: noai``), and writes the shard in its own layout: ``<shard>.tar`` (or ``.parquet``), the
``<shard>.parquet`` of every row's status, and last ``<shard>_stats.json``. That last file is what marks a
shard done: a shard without it is downloaded again from its start, its partial files overwritten, so a killed
run ends with every sample once.

``download_command`` is the same download as one img2dataset command line, for those who run it by hand.

What is not img2dataset's here is the sharding (consecutive runs of the filtered metadata's rows, planned from
the parquet footers, so the same rows always make the same shard) and the accounting (every row's outcome as a
failure kind, read back from the shards' own parquet).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from ldm.data.filters import Filters
from ldm.data.sources import Columns
from ldm.storage import Storage

SHARD_DIGITS = 5  # img2dataset's minimum width for shard names (00000.tar)
STATS = "_stats.json"


@dataclass(frozen=True)
class Shard:
    index: int
    pieces: tuple[tuple[str, int, int], ...]  # (metadata parquet URL, first row, end row) in order

    @property
    def rows(self) -> int:
        return sum(end - start for _, start, end in self.pieces)


def plan_shards(files: Sequence[tuple[str, int]], per_shard: int) -> list[Shard]:
    """Consecutive runs of ``per_shard`` rows across ``files`` ((URL, row count), in order): the last shard may
    be shorter, and a shard may span two files."""
    shards: list[Shard] = []
    pieces: list[tuple[str, int, int]] = []
    held = 0
    for url, rows in files:
        start = 0
        while start < rows:
            take = min(per_shard - held, rows - start)
            pieces.append((url, start, start + take))
            held += take
            start += take
            if held == per_shard:
                shards.append(Shard(len(shards), tuple(pieces)))
                pieces, held = [], 0
    if pieces:
        shards.append(Shard(len(shards), tuple(pieces)))
    return shards


def shard_name(index: int, shards: int) -> str:
    return f"{index:0{max(SHARD_DIGITS, len(str(max(shards - 1, 0))))}d}"


# The roles whose columns a download carries beside img2dataset's own: the ones prepare filters images on, and
# the class and layout that class-conditional and layout-to-image models train on.
CARRIED_ROLES = ("nsfw", "similarity", "width", "height", "label", "boxes")
# The columns img2dataset writes itself: a carried column of the same name would clash with them.
RESERVED = (
    "key",
    "caption",
    "url",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "exif",
    "md5",
    "sha256",
    "sha512",
)


def carried_columns(columns: Columns, extra_columns: Sequence[str] = ()) -> list[str]:
    """The metadata columns a download keeps beside img2dataset's own (``--save_additional_columns``): the
    ones prepare filters images on, class and layout, and ``extra_columns``."""
    named = [(f"data.input.{role}_col", getattr(columns, role)) for role in CARRIED_ROLES if getattr(columns, role)]
    named += [("data.input.extra_columns", name) for name in extra_columns]
    clashes = [f"{setting}={name!r}" for setting, name in named if name in RESERVED]
    if clashes:
        raise ValueError(
            f"img2dataset writes columns of these names itself, so they cannot be carried into a download: "
            f"{', '.join(clashes)}; its own are {list(RESERVED)}. Rename the column in the metadata."
        )
    return list(dict.fromkeys(name for _, name in named))


def downloaded_input(columns: Columns, output_format: str, encode_format: str) -> dict[str, Any]:
    """``data.input`` for what a download wrote: img2dataset names the URL and caption ``url`` and
    ``caption`` and keeps the carried columns under their own names."""
    return {
        "format": output_format,
        "url_col": "url",
        "caption_col": "caption",
        **{f"{role}_col": getattr(columns, role) for role in CARRIED_ROLES},
        "status_col": "status",
        "sha256_col": "sha256",
        "key_col": "key",
        "image_col": encode_format,
        "optional": [],
    }


# img2dataset's error messages, as a kind per cause (its messages embed byte counts and hosts).
FAILURES = (
    (re.compile(r"HTTP Error (\d{3})"), lambda m: f"http_{m.group(1)}"),
    (re.compile(r"timed out", re.I), lambda m: "timeout"),
    (re.compile(r"IncompleteRead|Connection broken|RemoteDisconnected", re.I), lambda m: "body_cut_short"),
    (re.compile(r"decoding error", re.I), lambda m: "not_an_image"),
    (re.compile(r"image too small"), lambda m: "image_too_small"),
    (re.compile(r"aspect ratio too large"), lambda m: "aspect_ratio"),
    (re.compile(r"image area too large"), lambda m: "image_too_large"),
    (re.compile(r"X-Robots-Tag"), lambda m: "opted_out"),
    (re.compile(r"hash mismatch"), lambda m: "hash_mismatch"),
    (re.compile(r"urlopen error|Connection refused|Name or service not known", re.I), lambda m: "unreachable"),
)


def outcome(status: str | None, error: str | None) -> str:
    """``success``, or the kind of failure an img2dataset row's error message says."""
    if status == "success":
        return "success"
    for pattern, kind in FAILURES:
        found = pattern.search(error or "")
        if found:
            return kind(found)
    return "other_error"


def shard_outcomes(storage: Storage, out: str, name: str) -> Counter[str]:
    """Each row's outcome in a finished shard, from the per-row parquet img2dataset wrote beside it."""
    fs, root = storage.fsspec(out)
    with fs.open(f"{root}/{name}.parquet", "rb") as f:
        table = pq.read_table(f, columns=["status", "error_message"])
    return Counter(outcome(s, e) for s, e in zip(table["status"].to_pylist(), table["error_message"].to_pylist()))


def shard_rows(storage: Storage, shard: Shard, columns: Columns, carried: Sequence[str]) -> pa.Table:
    """A shard's rows as img2dataset's reader hands them to its downloader: the carried columns, then
    ``caption`` and ``url``. Only the row groups that hold them are read."""
    names = [*carried, columns.caption, columns.url]
    tables = []
    for url, start, end in shard.pieces:
        fs, path = storage.fsspec(url)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            groups, first, offset = [], None, 0
            for group in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if offset < end and offset + rows > start:
                    groups.append(group)
                    first = offset if first is None else first
                offset += rows
            table = parquet.read_row_groups(groups, columns=names)
        tables.append(table.slice(start - first, end - start))
    return pa.concat_tables(tables).rename_columns([*carried, "caption", "url"])


def download_shard(
    storage: Storage,
    shard: Shard,
    name: str,
    out: str,
    columns: Columns,
    carried: Sequence[str],
    options: Mapping[str, Any],
) -> Counter[str]:
    """Download one shard into ``out`` with img2dataset's downloader; the outcome of each of its rows. A shard
    already finished (its ``_stats.json`` there, every row accounted for) is only read back.

    ``options``: ``stage.download``'s settings. img2dataset writes ``_stats.json`` even when writing some
    samples failed (it prints and goes on), so a shard whose parquet does not hold every row is not finished:
    its stats are removed and the error raised, and the next run downloads it again.
    """
    fs, root = storage.fsspec(out)
    stats = f"{root}/{name}{STATS}"
    if fs.exists(stats):
        try:
            outcomes = shard_outcomes(storage, out, name)
        except Exception:  # its parquet gone or unreadable: not finished after all
            outcomes = Counter()
        if sum(outcomes.values()) == shard.rows:
            return outcomes
    # albumentations (an img2dataset dependency) asks the network for a newer version when imported.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import ParquetSampleWriter, WebDatasetSampleWriter

    storage.configure_fsspec()  # img2dataset opens out with fsspec itself
    writer = {"webdataset": WebDatasetSampleWriter, "parquet": ParquetSampleWriter}[options["output_format"]]
    resize = options["resize_mode"]
    resizer = Resizer(
        image_size=options["image_size"],
        resize_mode=resize,
        resize_only_if_bigger=options["resize_only_if_bigger"],
        encode_format=options["encode_format"],
        encode_quality=options["encode_quality"],
        skip_reencode=resize == "no",
        min_image_size=options["min_image_size"] or 0,
        max_aspect_ratio=options["max_aspect_ratio"] or math.inf,
    )
    rows = shard_rows(storage, shard, columns, carried)
    downloader = Downloader(
        sample_writer_class=writer,
        resizer=resizer,
        thread_count=options["resources"]["thread_count"],
        save_caption=True,
        extract_exif=False,
        output_folder=out,
        column_list=rows.column_names,
        timeout=options["timeout"],
        number_sample_per_shard=options["number_sample_per_shard"],
        oom_shard_count=len(name),
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format=options["encode_format"],
        retries=options["retries"],
        user_agent_token=options["user_agent_token"],
        disallowed_header_directives=list(options["disallowed_header_directives"]) or None,
    )
    with tempfile.TemporaryDirectory(prefix="download-") as local:
        rows_file = f"{local}/{name}.feather"
        feather.write_feather(rows, rows_file, compression="uncompressed")
        downloader.download_shard((shard.index, rows_file))  # raises on failure, unlike downloader(...)
    outcomes = shard_outcomes(storage, out, name)
    if sum(outcomes.values()) != shard.rows:
        fs.rm(stats)
        raise RuntimeError(
            f"shard {name} ({out}): {shard.rows} rows given, {sum(outcomes.values())} written; "
            "img2dataset printed why above. Re-run to download it again."
        )
    return outcomes


def download_command(
    metadata_url: str,
    output_url: str,
    columns: Columns,
    filters: Filters,
    options: Mapping[str, Any],
    extra_columns: Sequence[str] = (),
) -> str:
    """An ``img2dataset`` command line for the filtered metadata at ``metadata_url``.

    JPEGs are kept as served (``--resize_mode no --skip_reencode``: decoded to check their size, never
    re-encoded): prepare keeps the original bytes, and encode_latents resizes once, to the training resolution. The
    additional columns carry the metadata the second prepare pass filters on; ``--compute_hash sha256`` feeds its
    duplicate-image rule.
    """
    extra = carried_columns(columns, extra_columns)
    args: dict[str, Any] = {
        "url_list": metadata_url,
        "input_format": "parquet",
        "url_col": columns.url,
        "caption_col": columns.caption,
        "output_format": options["output_format"],
        "output_folder": output_url,
        "processes_count": options["processes_count"],
        "thread_count": options["thread_count"],
        "number_sample_per_shard": options["number_sample_per_shard"],
        "resize_mode": "no",
        "skip_reencode": True,
        "compute_hash": "sha256",
        "enable_wandb": False,
    }
    if extra:
        args["save_additional_columns"] = json.dumps(extra)
    if filters.min_width is not None or filters.min_height is not None:
        args["min_image_size"] = min(v for v in (filters.min_width, filters.min_height) if v is not None)
    if filters.max_aspect_ratio is not None:
        args["max_aspect_ratio"] = filters.max_aspect_ratio
    return "img2dataset " + " ".join(f"--{name} {shlex.quote(str(value))}" for name, value in args.items())
