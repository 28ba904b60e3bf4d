"""The inputs stage=prepare reads, one *unit* (an input file, or a part of one) at a time.

Three formats, as they exist in the wild:

- ``metadata``: LAION-style parquet of URLs and captions with their metadata (LAION-400M's ``part-*.parquet``),
  the input of img2dataset. A large file is split into units of whole row groups, so that one 12.5M-row file
  keeps several CPUs busy;
- ``parquet``: parquet with the image bytes, one row per sample: img2dataset's ``output_format=parquet`` shards,
  or an image-caption set as the hub ships it (an ``image`` column of ``{bytes, path}`` structs is read too);
- ``webdataset``: tars of ``<key>.<ext>`` members. With the ``<shard>.parquet`` img2dataset writes beside each
  tar, the parquet is the unit's row list: it has a row for every sample of the shard, failed downloads
  included, so a unit's row count is the number of URLs it was given. A tar alone (as the hub ships
  image-text sets) is read from its members: the image by extension, the caption from ``.txt``, the other
  columns from ``.json``.

A unit is processed whole by one task, which is what makes the stage resumable at unit granularity.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ldm.storage import Storage

T = TypeVar("T")
FORMATS = ("metadata", "parquet", "webdataset")
ROW = "_row"  # a row's index in its file, carried through every batch: (unit, row) identifies a sample
IMAGE = "_image"  # the image bytes, under one name whatever the input format calls them
KEY = "_key"  # a sample key made from the file name and row, for parquet inputs that have none
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a tar member with one of these is the sample's image
# The types of the role columns read from a tar's .json members (JSON has no schema to take them from).
ROLE_TYPES = {
    "url": pa.string(),
    "caption": pa.string(),
    "similarity": pa.float64(),
    "nsfw": pa.string(),
    "width": pa.int64(),
    "height": pa.int64(),
    "status": pa.string(),
    "sha256": pa.string(),
    "key": pa.string(),
    "label": pa.string(),
    "boxes": pa.string(),
}


class MissingColumnError(ValueError):
    """An input file lacks a column the configured format and filters need."""


class UnreadableInputError(OSError):
    """An input file that cannot be opened as what its format says it is."""


@dataclass(frozen=True)
class Columns:
    """Which input column plays which role; None: the data has no such column (its rule is skipped)."""

    url: str | None
    caption: str
    similarity: str | None = None
    nsfw: str | None = None
    width: str | None = None  # declared size: LAION's WIDTH/HEIGHT, before anything is downloaded
    height: str | None = None
    status: str | None = None  # img2dataset's download status
    sha256: str | None = None
    key: str | None = None  # None for a parquet input: keys are made from the file name and row
    image: str | None = None  # parquet column holding the encoded image; for tars an extension (None: any image)
    label: str | None = None  # the image's class (class-conditional models)
    boxes: str | None = None  # its layout: JSON [{"label": class, "box": [x0, y0, x1, y1]}], relative coordinates
    optional: tuple[str, ...] = ()  # roles whose column may be absent from the data: then their rule is skipped

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Columns:
        roles = {f.name: cfg.get(f"{f.name}_col") for f in fields(cls) if f.name != "optional"}
        optional = tuple(cfg.get("optional") or ())
        unknown = sorted(set(optional) - set(roles) | ({"caption", "image"} & set(optional)))
        if unknown:
            raise ValueError(
                f"data.input.optional={list(optional)}: {unknown} cannot be optional; expected roles among "
                f"{sorted(set(roles) - {'caption', 'image'})}"
            )
        return cls(**roles, optional=optional)

    def present(self) -> dict[str, str]:
        """role -> column name, for the roles this data has."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "optional" and getattr(self, f.name) is not None
        }

    def validate(self, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"data.input.format={fmt!r}: expected one of {list(FORMATS)}")
        if fmt == "metadata" and self.url is None:
            raise ValueError("data.input.format=metadata is a list of URLs to download: data.input.url_col is needed")
        missing = {"parquet": ["image"], "webdataset": ["key"]}.get(fmt, [])
        missing = [role for role in missing if getattr(self, role) is None]
        if missing:
            raise ValueError(
                f"data.input.format={fmt} needs " + ", ".join(f"data.input.{role}_col" for role in missing)
            )

    def resolved(self, have: Collection[str]) -> tuple[Columns, dict[str, str]]:
        """These columns for data that has the columns ``have``: each optional role whose column is absent set
        to None. Also returns those roles, with the column each was looked for under."""
        absent = {role: name for role, name in self.present().items() if role in self.optional and name not in have}
        return replace(self, **{role: None for role in absent}), absent

    def metadata_columns(self) -> list[str]:
        """The columns read from a unit's metadata (everything but the image)."""
        return [name for role, name in self.present().items() if role != "image"]


@dataclass(frozen=True)
class Unit:
    index: int
    path: str  # the data file: a parquet file or a webdataset tar
    metadata_path: str | None  # the parquet with one row per sample: the file itself, the tar's sibling, or None
    row_groups: tuple[int, int] | None = None  # a part of a parquet file: its row groups [start, stop)
    first_row: int = 0  # the part's first row in the file

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def list_units(storage: Storage, url: str, fmt: str, rows_per_unit: int | None = None) -> tuple[list[Unit], str]:
    """The input files under ``url`` (or ``url`` itself when it is a file) in a fixed order, and a fingerprint
    of the listing (names and sizes) that changes when the input does. With ``rows_per_unit``, metadata files
    are split into units of whole row groups holding about that many rows (the same rows in the same order)."""
    fs, root = storage.fsspec(url)
    try:
        if not fs.exists(root):
            raise FileNotFoundError(f"data.input.url={url}: no such file or directory")
        if fs.isfile(root):
            listing = {root: fs.info(root)}
            if fmt == "webdataset" and root.endswith(".tar") and fs.exists(_sibling(root)):
                listing[_sibling(root)] = fs.info(_sibling(root))
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
    units: list[Unit] = []
    for path in paths:
        if fmt != "webdataset":
            metadata_path = path
        else:  # img2dataset's parquet when it is there; a tar alone is read from its members
            metadata_path = _sibling(path) if _sibling(path) in sizes else None
        file_url = _url(storage, url, path)
        meta_url = metadata_path and _url(storage, url, metadata_path)
        if fmt == "metadata" and rows_per_unit:
            for groups, first in _row_group_parts(storage, file_url, rows_per_unit):
                units.append(Unit(len(units), file_url, meta_url, groups, first))
        else:
            units.append(Unit(len(units), file_url, meta_url))
    used = sorted({*paths, *(_sibling(p) for p in paths if fmt == "webdataset" and _sibling(p) in sizes)})
    digest = hashlib.sha256("\n".join(f"{p}\t{sizes[p]}" for p in used).encode()).hexdigest()
    return units, digest


def _sibling(tar: str) -> str:
    """The parquet img2dataset writes beside a tar."""
    return tar[: -len(".tar")] + ".parquet"


def _row_group_parts(storage: Storage, url: str, rows_per_unit: int) -> list[tuple[tuple[int, int] | None, int]]:
    """([start, stop) row groups, first row) of each part of a parquet file, consecutive row groups gathered
    until a part holds ``rows_per_unit`` rows; (None, 0) for a file that is one part."""
    fs, path = storage.fsspec(url)
    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
    except Exception as error:
        raise UnreadableInputError(f"{url}: cannot be read as parquet: {error}") from error
    rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    parts, start, first, held = [], 0, 0, 0
    for group, n in enumerate(rows):
        held += n
        if held >= rows_per_unit or group == len(rows) - 1:
            parts.append(((start, group + 1), first))
            start, first, held = group + 1, first + held, 0
    return parts if len(parts) > 1 else [(None, 0)]


def available_columns(storage: Storage, unit: Unit, columns: Columns) -> list[str]:
    """The columns a unit has: its parquet's schema, or for a tar alone what its first sample holds (the
    .json fields, the caption if there is a .txt, the key)."""
    if unit.metadata_path is not None:
        fs, path = storage.fsspec(unit.metadata_path)
        with fs.open(path, "rb") as f:
            return pq.read_schema(f).names
    for sample in _tar_samples(storage, unit, columns.image, images=False):
        return list(sample.columns(columns))
    raise UnreadableInputError(f"{unit.path}: no sample could be read from it as a tar")


def check_columns(storage: Storage, unit: Unit, columns: Columns, fmt: str, have: list[str] | None = None) -> None:
    """One error naming the file, the missing column(s) and the columns the file does have (``have``, when
    the caller has read them already)."""
    have = available_columns(storage, unit, columns) if have is None else have
    need = columns.metadata_columns() + ([columns.image] if fmt == "parquet" else [])
    if unit.metadata_path is None:
        # A tar alone has no schema: each sample's .json has its own fields (a missing one is null), so only
        # the caption is required of its first sample; the key is the member name, the image a member.
        need = [columns.caption]
    missing = [c for c in need if c not in have]
    if missing:
        roles = {name: role for role, name in columns.present().items()}
        wanted = ", ".join(f"{c!r} (data.input.{roles[c]}_col)" for c in missing)
        raise MissingColumnError(
            f"{unit.metadata_path or unit.path}: missing column {wanted}; the file has {have}; expected {need}. Set "
            "the data.input.*_col names to this data's columns, to null for a column it does not have, or list "
            "the role in data.input.optional to skip its rule where the column is absent."
        )


def checked(storage: Storage, unit: Unit, columns: Columns, fmt: str, have: list[str] | None = None) -> None:
    """``check_columns``, with any failure to read the file (empty, not parquet) named by its path."""
    readable(lambda: check_columns(storage, unit, columns, fmt, have), unit)


def readable(read: Callable[[], T], unit: Unit) -> T:
    """``read()``, with any failure to read the unit's file (empty, not parquet, not a tar) named by its path."""
    try:
        return read()
    except (MissingColumnError, UnreadableInputError):
        raise
    except Exception as error:
        kind = "parquet" if unit.metadata_path is not None else "a tar"
        raise UnreadableInputError(f"{unit.metadata_path or unit.path}: cannot be read as {kind}: {error}") from error


def read_metadata(storage: Storage, unit: Unit, fmt: str, columns: Columns, batch_rows: int) -> Iterator[pa.Table]:
    """The unit's per-sample columns (everything the roles name but the image) in bounded batches, each with
    its ``_row`` index (and ``_key`` when the data has no key column)."""
    if unit.metadata_path is None:
        yield from _tar_tables(storage, unit, columns, batch_rows, images=False)
        return
    yield from _keyed(_parquet_batches(storage, unit, columns.metadata_columns(), batch_rows), unit, fmt, columns)


def read_samples(storage: Storage, unit: Unit, fmt: str, columns: Columns, batch_rows: int) -> Iterator[pa.Table]:
    """Every column of the unit, plus ``_row`` and (for image formats) ``_image``, in bounded batches."""
    if fmt == "metadata":
        yield from _parquet_batches(storage, unit, None, batch_rows)
    elif fmt == "parquet":
        for table in _keyed(_parquet_batches(storage, unit, None, batch_rows), unit, fmt, columns):
            image = table[columns.image]
            if pa.types.is_struct(image.type):  # the hub's Image feature: {bytes, path}
                image = pc.struct_field(image, "bytes")
            yield table.append_column(IMAGE, image.cast(pa.binary())).drop_columns([columns.image])
    elif unit.metadata_path is None:
        yield from _tar_tables(storage, unit, columns, batch_rows, images=True)
    else:
        yield from _webdataset_samples(storage, unit, columns, batch_rows)


def _parquet_batches(storage: Storage, unit: Unit, names: list[str] | None, batch_rows: int) -> Iterator[pa.Table]:
    fs, path = storage.fsspec(unit.metadata_path)
    offset = unit.first_row
    groups = range(*unit.row_groups) if unit.row_groups else None
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=names, row_groups=groups):
            table = pa.Table.from_batches([batch])
            yield table.append_column(ROW, pa.array(range(offset, offset + len(table)), pa.int64()))
            offset += len(table)


def _keyed(tables: Iterator[pa.Table], unit: Unit, fmt: str, columns: Columns) -> Iterator[pa.Table]:
    """Image rows without a key column get one made from the file name and the row: unique and stable."""
    for table in tables:
        if fmt != "metadata" and columns.key is None:
            stem = unit.name.rsplit(".", 1)[0]
            table = table.append_column(KEY, pa.array([f"{stem}-{row}" for row in table[ROW].to_pylist()], pa.string()))
        yield table


@dataclass
class _Sample:
    """The members of a tar that share a name up to its first dot."""

    stem: str
    meta: dict[str, Any]  # from the .json member
    text: str | None  # the .txt member
    image: bytes | None

    def columns(self, columns: Columns) -> dict[str, Any]:
        """Column name -> value: the .json fields, the caption from .txt, the key from the member name."""
        values = dict(self.meta)
        if self.text is not None:
            values[columns.caption] = self.text
        values[columns.key or KEY] = self.stem
        return values


def _tar_samples(storage: Storage, unit: Unit, image_extension: str | None, images: bool) -> Iterator[_Sample]:
    """A tar's samples in member order. A tar cut short ends with the sample whose member was being read,
    without the members it did not get: it is then dropped under the first rule it fails (no image, or no
    status when its .json was not reached)."""
    fs, path = storage.fsspec(unit.path)
    sample: _Sample | None = None
    prefix = None
    with fs.open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|")
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, _, extension = base.partition(".")
                if (folder, stem) != prefix:
                    if sample is not None:
                        yield sample
                    prefix, sample = (folder, stem), _Sample(stem, {}, None, None)
                extension = extension.lower()
                is_image = extension == image_extension if image_extension else extension in IMAGE_EXTENSIONS
                if extension == "json":
                    sample.meta = _json_fields(tar.extractfile(member).read())
                elif extension == "txt":
                    sample.text = tar.extractfile(member).read().decode("utf-8", "replace")
                elif is_image and sample.image is None:
                    data = tar.extractfile(member).read()  # read even when unused: a short read shows truncation
                    sample.image = data if images else b""
        except (tarfile.TarError, EOFError):
            # A tar cut short (an interrupted copy) or garbled. Network errors are not caught: a retry must
            # not lose rows.
            pass
    if sample is not None:
        yield sample


def _json_fields(data: bytes) -> dict[str, Any]:
    """A .json member's top-level fields (nested values as JSON text); unreadable JSON gives none."""
    try:
        meta = json.loads(data)
    except ValueError:
        return {}
    if not isinstance(meta, dict):
        return {}
    return {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in meta.items()}


def _tar_tables(storage: Storage, unit: Unit, columns: Columns, batch_rows: int, images: bool) -> Iterator[pa.Table]:
    """A tar alone as tables of the role columns, typed, with ``_row`` (the sample's place in the tar) and,
    with ``images``, ``_image``."""
    names = {role: name for role, name in columns.present().items() if role != "image"}
    names.setdefault("key", KEY)
    batch: list[_Sample] = []
    row = 0

    def table() -> pa.Table:
        values = [s.columns(columns) for s in batch]
        arrays = {name: _typed([v.get(name) for v in values], ROLE_TYPES[role], name) for role, name in names.items()}
        arrays[ROW] = pa.array(range(row - len(batch), row), pa.int64())
        if images:
            arrays[IMAGE] = pa.array([s.image for s in batch], pa.binary())
        batch.clear()
        return pa.table(arrays)

    for sample in _tar_samples(storage, unit, columns.image, images):
        batch.append(sample)
        row += 1
        if len(batch) >= batch_rows:
            yield table()
    if batch:
        yield table()


def _typed(values: list[Any], type_: pa.DataType, name: str) -> pa.Array:
    try:
        return pa.array(values, type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # "0.31" for a float, 512 for a string: JSON is loose
        try:
            return pc.cast(pa.array([None if v is None else str(v) for v in values], pa.string()), type_)
        except pa.ArrowInvalid as error:
            raise ValueError(f"column {name!r}: expected {type_} values, {error}") from None


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
    images: list[bytes | None] = []

    def flush() -> pa.Table:
        table = metadata.take(pa.array(rows, pa.int64())).append_column(IMAGE, pa.array(images, pa.binary()))
        rows.clear()
        images.clear()
        return table

    for sample in _tar_samples(storage, unit, columns.image, images=True):
        row = index.get(sample.stem)
        if row is None or row in seen or sample.image is None:
            continue  # a sample that lost its image to a cut is listed below, with the failed downloads
        seen.add(row)
        rows.append(row)
        images.append(sample.image)
        if len(rows) >= batch_rows:
            yield flush()
    if rows:
        yield flush()
    missing = [i for i in range(len(metadata)) if i not in seen]
    for start in range(0, len(missing), batch_rows):
        part = missing[start : start + batch_rows]
        yield metadata.take(pa.array(part, pa.int64())).append_column(IMAGE, pa.nulls(len(part), pa.binary()))


def _url(storage: Storage, base_url: str, path: str) -> str:
    """The URL of a listed ``path`` (fsspec paths of S3 objects carry no scheme)."""
    return f"s3://{path}" if not storage.is_local(base_url) else path
