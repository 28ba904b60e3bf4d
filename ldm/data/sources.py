"""The inputs stage=prepare reads, one *unit* (input file) at a time.

Three formats, as they exist in the wild:

- ``metadata``: LAION-style parquet of URLs and captions with their metadata (LAION-400M's ``part-*.parquet``),
  the input of img2dataset;
- ``parquet``: img2dataset's ``output_format=parquet`` shards, one row per sample with the image bytes;
- ``webdataset``: img2dataset's tars (``<key>.jpg/.txt/.json``), each with the ``<shard>.parquet`` img2dataset
  writes beside it. That parquet has a row for every sample of the shard, failed downloads included, so a
  unit's row count is the number of URLs it was given, and every one of them is accounted for.

A unit is processed whole by one task, which is what makes the stage resumable at file granularity.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass, fields
from typing import Any, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from ldm.storage import Storage

FORMATS = ("metadata", "parquet", "webdataset")
ROW = "_row"  # a row's index in its unit, carried through every batch: (unit, row) identifies a sample
IMAGE = "_image"  # the image bytes, under one name whatever the input format calls them


class MissingColumnError(ValueError):
    """An input file lacks a column the configured format and filters need."""


class UnreadableInputError(OSError):
    """An input file that cannot be opened as what its format says it is."""


@dataclass(frozen=True)
class Columns:
    """Which input column plays which role; None: the data has no such column (its filter is skipped)."""

    url: str | None
    caption: str
    similarity: str | None = None
    nsfw: str | None = None
    width: str | None = None  # declared size: LAION's WIDTH/HEIGHT, before anything is downloaded
    height: str | None = None
    status: str | None = None  # img2dataset's download status
    sha256: str | None = None
    key: str | None = None
    image: str | None = None  # parquet column / tar member extension holding the encoded image

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Columns":
        return cls(**{f.name: cfg.get(f"{f.name}_col") for f in fields(cls)})

    def present(self) -> dict[str, str]:
        """role -> column name, for the roles this data has."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def validate(self, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"data.input.format={fmt!r}: expected one of {list(FORMATS)}")
        if fmt == "metadata" and self.url is None:
            raise ValueError("data.input.format=metadata is a list of URLs to download: data.input.url_col is needed")
        if fmt != "metadata":
            missing = [role for role in ("key", "image") if getattr(self, role) is None]
            if missing:
                raise ValueError(
                    f"data.input.format={fmt} (img2dataset output) needs "
                    + ", ".join(f"data.input.{role}_col" for role in missing)
                )

    def metadata_columns(self) -> list[str]:
        """The columns read from a unit's metadata (everything but the image)."""
        return [name for role, name in self.present().items() if role != "image"]


@dataclass(frozen=True)
class Unit:
    index: int
    path: str  # the data file: a parquet file or a webdataset tar
    metadata_path: str  # the parquet with one row per sample: the file itself, or the tar's sibling

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def list_units(storage: Storage, url: str, fmt: str) -> tuple[list[Unit], str]:
    """The input files under ``url`` (or ``url`` itself when it is a file) in a fixed order, and a fingerprint
    of the listing (names and sizes) that changes when the input does."""
    fs, root = storage.fsspec(url)
    try:
        if not fs.exists(root):
            raise FileNotFoundError(f"data.input.url={url}: no such file or directory")
        if fs.isfile(root):
            listing = {root: fs.info(root)}
            sibling = root[: -len(".tar")] + ".parquet"
            if fmt == "webdataset" and root.endswith(".tar") and fs.exists(sibling):
                listing[sibling] = fs.info(sibling)
        else:
            listing = fs.find(root, detail=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # permissions, unreachable endpoint: say which URL
        raise OSError(f"cannot read data.input.url={url}: {error}") from error
    sizes = {path: int(info.get("size") or 0) for path, info in listing.items() if info.get("type") != "directory"}
    extension = ".tar" if fmt == "webdataset" else ".parquet"
    paths = sorted(p for p in sizes if p.endswith(extension) and not p.rsplit("/", 1)[-1].startswith(("_", ".")))
    if not paths:
        raise FileNotFoundError(f"data.input.url={url}: no *{extension} files for data.input.format={fmt}")
    units = []
    for index, path in enumerate(paths):
        metadata_path = path[: -len(".tar")] + ".parquet" if fmt == "webdataset" else path
        if metadata_path not in sizes:
            raise FileNotFoundError(
                f"{_url(storage, url, path)}: no {metadata_path.rsplit('/', 1)[-1]} beside it "
                "(img2dataset writes one per tar, with every sample's status)"
            )
        units.append(Unit(index, _url(storage, url, path), _url(storage, url, metadata_path)))
    used = sorted({p for u in units for p in (u.path, u.metadata_path)})
    digest = hashlib.sha256("\n".join(f"{p}\t{sizes[_path(storage, p)]}" for p in used).encode()).hexdigest()
    return units, digest


def check_columns(storage: Storage, unit: Unit, columns: Columns, fmt: str) -> None:
    """One error naming the file, the missing column(s) and the columns the file does have."""
    fs, path = storage.fsspec(unit.metadata_path)
    with fs.open(path, "rb") as f:
        have = pq.read_schema(f).names
    need = columns.metadata_columns() + ([columns.image] if fmt == "parquet" else [])
    missing = [c for c in need if c not in have]
    if missing:
        roles = {name: role for role, name in columns.present().items()}
        wanted = ", ".join(f"{c!r} (data.input.{roles[c]}_col)" for c in missing)
        raise MissingColumnError(
            f"{unit.metadata_path}: missing column {wanted}; the file has {have}; expected {need}. Set the "
            "data.input.*_col names to this data's columns, or to null for a column it does not have."
        )


def checked(storage: Storage, unit: Unit, columns: Columns, fmt: str) -> None:
    """``check_columns``, with any failure to read the file (empty, not parquet) named by its path."""
    try:
        check_columns(storage, unit, columns, fmt)
    except MissingColumnError:
        raise
    except Exception as error:
        raise UnreadableInputError(f"{unit.metadata_path}: cannot be read as parquet: {error}") from error


def read_metadata(storage: Storage, unit: Unit, names: list[str] | None, batch_rows: int) -> Iterator[pa.Table]:
    """The unit's per-sample columns ``names`` (None: all) in bounded batches, each with its ``_row`` index."""
    fs, path = storage.fsspec(unit.metadata_path)
    offset = 0
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=names):
            table = pa.Table.from_batches([batch])
            yield table.append_column(ROW, pa.array(range(offset, offset + len(table)), pa.int64()))
            offset += len(table)


def read_samples(storage: Storage, unit: Unit, fmt: str, columns: Columns, batch_rows: int) -> Iterator[pa.Table]:
    """Every column of the unit, plus ``_row`` and (for image formats) ``_image``, in bounded batches."""
    if fmt == "metadata":
        yield from read_metadata(storage, unit, None, batch_rows)
        return
    if fmt == "parquet":
        for table in read_metadata(storage, unit, None, batch_rows):
            yield table.append_column(IMAGE, table[columns.image].cast(pa.binary())).drop_columns([columns.image])
        return
    yield from _webdataset_samples(storage, unit, columns, batch_rows)


def _webdataset_samples(storage: Storage, unit: Unit, columns: Columns, batch_rows: int) -> Iterator[pa.Table]:
    """Tar members streamed in order and joined to the sibling parquet's rows by key; the rows with no image
    in the tar (failed downloads) come last, with a null image."""
    fs, path = storage.fsspec(unit.metadata_path)
    with fs.open(path, "rb") as f:
        metadata = pq.read_table(f)  # one shard's metadata: bounded by img2dataset's number_sample_per_shard
    metadata = metadata.append_column(ROW, pa.array(range(len(metadata)), pa.int64()))
    index = {key: i for i, key in enumerate(metadata[columns.key].to_pylist())}
    seen: set[int] = set()
    rows: list[int] = []
    images: list[bytes] = []

    def flush() -> pa.Table:
        table = metadata.take(pa.array(rows, pa.int64())).append_column(IMAGE, pa.array(images, pa.binary()))
        rows.clear()
        images.clear()
        return table

    fs, path = storage.fsspec(unit.path)
    with fs.open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|")
            for member in tar:
                stem, _, extension = member.name.rsplit("/", 1)[-1].partition(".")
                if not member.isfile() or extension != columns.image or stem not in index or index[stem] in seen:
                    continue
                image = tar.extractfile(member).read()
                seen.add(index[stem])
                rows.append(index[stem])
                images.append(image)
                if len(rows) >= batch_rows:
                    yield flush()
        except (tarfile.TarError, EOFError):
            # A tar cut short (an interrupted copy) or garbled: the samples after the break have no image and
            # are counted undecodable. Network errors are not caught: a retry must not lose rows.
            pass
    if rows:
        yield flush()
    missing = [i for i in range(len(metadata)) if i not in seen]
    for start in range(0, len(missing), batch_rows):
        part = missing[start : start + batch_rows]
        yield metadata.take(pa.array(part, pa.int64())).append_column(IMAGE, pa.nulls(len(part), pa.binary()))


def _path(storage: Storage, url: str) -> str:
    return storage.fsspec(url)[1]


def _url(storage: Storage, base_url: str, path: str) -> str:
    """The URL of a listed ``path`` (fsspec paths of S3 objects carry no scheme)."""
    return f"s3://{path}" if not storage.is_local(base_url) else path
