"""Parquet output in files of bounded size."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from ldm.storage import Storage


class PartWriter:
    """Writes tables to ``<url>/<stem>-NNNN.parquet``, starting a new file at ``max_rows`` rows or
    ``max_bytes`` (uncompressed Arrow) bytes, whichever comes first; remembers what it wrote, how big, and the
    rows of each file's row groups (a training epoch's order is planned from them without opening a file)."""

    def __init__(self, storage: Storage, url: str, stem: str, max_rows: int, max_bytes: int):
        if max_rows < 1 or max_bytes < 1:
            raise ValueError(f"part limits must be positive, got max_rows={max_rows}, max_bytes={max_bytes}")
        self.fs, self.root = storage.fsspec(url)
        self.stem, self.max_rows, self.max_bytes = stem, max_rows, max_bytes
        self.files: dict[str, int] = {}  # name relative to url -> size
        self.row_groups: dict[str, list[int]] = {}  # name relative to url -> rows of each row group
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._file = None
        self._name = ""
        self._rows = self._bytes = 0

    def write(self, table: pa.Table) -> None:
        start = 0
        while start < len(table):
            if self._writer is None:
                self._open(table.schema)
            bytes_per_row = max(1, table.nbytes // max(1, len(table)))
            room = min(self.max_rows - self._rows, max(1, (self.max_bytes - self._bytes) // bytes_per_row))
            piece = table.slice(start, room)
            self._writer.write_table(piece.cast(self._writer.schema), row_group_size=len(piece))
            self.row_groups.setdefault(self._name, []).append(len(piece))
            self._rows += len(piece)
            self._bytes += piece.nbytes
            self.rows += len(piece)
            start += len(piece)
            if self._rows >= self.max_rows or self._bytes >= self.max_bytes:
                self._close_file()

    def close(self) -> dict[str, int]:
        self._close_file()
        return dict(self.files)

    def _open(self, schema: pa.Schema) -> None:
        self._name = f"{self.stem}-{len(self.files):04d}.parquet"
        path = f"{self.root}/{self._name}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self._file = self.fs.open(path, "wb")
        self._writer = pq.ParquetWriter(self._file, schema)
        self._rows = self._bytes = 0

    def _close_file(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        self.files[self._name] = int(self.fs.size(f"{self.root}/{self._name}"))
        self._writer = self._file = None
