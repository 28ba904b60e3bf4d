"""Each epoch's row order, and batches of consecutive epochs through one bounded queue.

``EpochOrder``: the order of an epoch is a function of the data's row groups, the seed and the epoch alone, and
the workers take equal consecutive runs of it. A checkpoint then says how far each worker got, as intervals of
that order, and a restart (with any number of workers) continues the epoch on exactly the rows not yet trained
on: exact mid-epoch resume, with nothing but row-group counts known in advance.

``EpochStream``: a data loader that starts each epoch only when the trainer asks for it makes the trainer wait, at every
epoch boundary, for everything that starting costs: with Ray Data's split streams, a barrier across the workers, a
new executor, read tasks, a shuffle buffer filling (~10 s measured on 2 cores). Here the thread starts the next
epoch as soon as it has handed over the last one's batches, while the trainer still works through the queue.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ldm.storage import Storage

END_OF_EPOCH = None
Interval = tuple[int, int]  # positions [start, stop) in an epoch's order


@dataclass(frozen=True)
class Piece:
    """Positions [lo, hi) of one window's shuffled rows: what one read hands over. ``groups`` are the window's
    row groups as (file index, row group) in the order their rows are concatenated before the shuffle."""

    groups: tuple[tuple[int, int], ...]
    seed: tuple[int, ...]  # the window's permutation, for ``numpy.random.default_rng``
    lo: int
    hi: int


class EpochOrder:
    """An epoch's order: the row groups permuted by (seed, epoch), cut into windows of about ``window_rows``
    consecutive rows, each window's rows permuted by (seed, epoch, window). Reading a window needs only its row
    groups, so memory is bounded by ``window_rows`` plus the largest row group, whatever the data's size.
    ``window_rows`` 0: row groups are permuted, rows within them keep their order."""

    def __init__(self, row_groups: Sequence[Sequence[int]], seed: int, window_rows: int):
        units = [(f, g, n) for f, groups in enumerate(row_groups) for g, n in enumerate(groups) if n > 0]
        self._units = np.array(units, dtype=np.int64).reshape(-1, 3)
        self.seed, self.window_rows = int(seed), int(window_rows)
        self.rows = int(self._units[:, 2].sum())
        digest = hashlib.sha1(self._units.tobytes())
        digest.update(json.dumps([self.seed, self.window_rows]).encode())
        self.identity = digest.hexdigest()  # a checkpoint's position means something only for the same order

    def windows(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch's units in order, and the windows as [start, stop) unit indices with their first position."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self._units))
        units = self._units[order]
        starts = np.concatenate([[0], np.cumsum(units[:, 2])[:-1]])
        # A window holds the units that start within one stretch of window_rows positions.
        _, first = np.unique(starts // max(1, self.window_rows), return_index=True)
        bounds = np.append(first, len(units))
        return units, bounds, starts[first] if len(units) else np.zeros(0, np.int64)

    def assignment(self, epoch: int, world: int, taken: Sequence[Interval] = ()) -> list[list[Interval]]:
        """Each rank's positions: the epoch's positions not in ``taken``, in order, cut into ``world`` runs of
        equal length (the last few, fewer than ``world``, wait for the next epoch), so every rank takes the same
        number of steps."""
        free, at = [], 0
        for start, stop in merge(taken):
            if start > at:
                free.append((at, start))
            at = max(at, stop)
        if at < self.rows:
            free.append((at, self.rows))
        share = sum(b - a for a, b in free) // max(1, world)
        ranks: list[list[Interval]] = []
        for _ in range(world):
            need, mine = share, []
            while need:
                a, b = free[0]
                take = min(need, b - a)
                mine.append((a, a + take))
                need -= take
                free[0] = (a + take, b)
                if a + take == b:
                    free.pop(0)
            ranks.append(mine)
        return ranks

    def pieces(self, epoch: int, positions: Sequence[Interval]) -> list[Piece]:
        """The reads that hand over ``positions``, in order."""
        units, bounds, window_starts = self.windows(epoch)
        out: list[Piece] = []
        for start, stop in positions:
            while start < stop:
                w = int(np.searchsorted(window_starts, start, side="right")) - 1
                end = int(window_starts[w + 1]) if w + 1 < len(window_starts) else self.rows
                hi = min(stop, end)
                groups = tuple((int(f), int(g)) for f, g, _ in units[bounds[w] : bounds[w + 1]])
                out.append(
                    Piece(
                        groups,
                        (self.seed, epoch, w) if self.window_rows else (),
                        start - int(window_starts[w]),
                        hi - int(window_starts[w]),
                    )
                )
                start = hi
        return out

    def taken_after(self, epoch: int, world: int, taken: Sequence[Interval], consumed: Sequence[int]) -> list[Interval]:
        """``taken`` and the first ``consumed[rank]`` positions of each rank's run: what a checkpoint records."""
        now = list(taken)
        for run, count in zip(self.assignment(epoch, world, taken), consumed):
            for a, b in run:
                if count <= 0:
                    break
                now.append((a, min(b, a + count)))
                count -= min(b, a + count) - a
        return merge(now)


def read_piece(
    storage: Storage,
    paths: Sequence[str],
    groups: Sequence[int],
    seed: Sequence[int],
    lo: int,
    hi: int,
    columns: Sequence[str],
) -> pa.Table:
    """A ``Piece``'s rows: its window's row groups (``paths[i]``'s group ``groups[i]``) read, shuffled, sliced."""
    tables = []
    for path, group in zip(paths, groups):
        fs, local = storage.pyarrow(path)
        with fs.open_input_file(local) as f:
            tables.append(pq.ParquetFile(f).read_row_group(group, columns=list(columns)))
    window = pa.concat_tables(tables)
    order = np.random.default_rng(list(seed)).permutation(len(window)) if seed else np.arange(len(window))
    return window.take(order[lo:hi])


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, overlapping and touching intervals joined."""
    out: list[Interval] = []
    for a, b in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class EpochStream:
    """``next()`` gives the batches of ``epochs(first)``, then ``END_OF_EPOCH``, then those of
    ``epochs(first + 1)`` ..., at most ``depth`` batches ahead of the caller. An error in the thread is raised
    by ``next()``."""

    def __init__(self, epochs: Callable[[int], Iterable[Any]], first: int, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(epochs, first), name="epoch-stream", daemon=True)
        self._thread.start()

    def next(self) -> Any:
        item = self._queue.get()
        if isinstance(item, _Failure):
            raise item.error
        return item

    def close(self) -> None:
        """Stop filling. The thread ends once it next hands over a batch (it may be inside the data source)."""
        self._stop.set()
        while not self._queue.empty():
            self._queue.get_nowait()

    def _fill(self, epochs: Callable[[int], Iterable[Any]], epoch: int) -> None:
        try:
            while not self._stop.is_set():
                for batch in epochs(epoch):
                    if not self._put(batch):
                        return
                if not self._put(END_OF_EPOCH):
                    return
                epoch += 1
        except BaseException as error:  # noqa: BLE001 - handed to the caller, which decides
            self._put(_Failure(error))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error
