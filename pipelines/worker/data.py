"""A training stage's data as each Ray Train worker reads it: each epoch's rows in a fixed order, from the
position a checkpoint recorded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

import pyarrow as pa
import ray.data

from ldm.data.epochs import EpochOrder, Interval, read_piece
from ldm.storage import Storage
from pipelines.worker.console import quiet_worker


@dataclass(frozen=True)
class EpochData:
    """A training stage's data files and how each epoch orders them (``EpochOrder``), sent to every worker. Each
    worker reads its own run of an epoch with Ray Data: the pieces in order (``preserve_order``), one read task
    per window, from the position a checkpoint recorded. Ray Train's split of one dataset cannot do this: which
    worker gets which block depends on who asks first, and an epoch can only start from its beginning."""

    files: list[str]
    row_groups: list[list[int]]
    columns: list[str]
    seed: int
    window_rows: int
    storage: Storage

    @cached_property
    def order(self) -> EpochOrder:
        return EpochOrder(self.row_groups, self.seed, self.window_rows)

    def resumed(self, state: dict[str, Any], stage: str, rank: int) -> list[Interval]:
        """The positions of the checkpoint's epoch already trained on, as ``position`` recorded them; none when
        the checkpoint's order is not this one (stage.resume from a run on other data, or another seed or
        shuffle: its position means nothing here)."""
        if state["data"]["order"] != self.order.identity:
            print(
                f"{stage}: rank {rank}: the checkpoint's epoch order is not this data's; "
                f"epoch {state['epoch']} starts from its beginning"
            )
            return []
        taken = [(int(a), int(b)) for a, b in state["data"]["taken"]]
        print(
            f"{stage}: rank {rank} resumed at step {state['step']}, epoch {state['epoch']} "
            f"({sum(b - a for a, b in taken)} of its {self.order.rows} rows already trained on)"
        )
        return taken

    def position(self, epoch: int, world: int, taken: Sequence[Interval], consumed: Sequence[int]) -> dict[str, Any]:
        """A checkpoint's data position: the order's identity and the positions of ``epoch`` trained on, those
        ``taken`` before this attempt and the first ``consumed[rank]`` of every rank's run since."""
        return {
            "order": self.order.identity,
            "taken": [list(t) for t in self.order.taken_after(epoch, world, taken, consumed)],
        }

    @staticmethod
    def check_share(consumed: int, taken: Sequence[Interval], rank: int, batch_size: int) -> None:
        """At the end of an epoch's run: a rank that got no batch at all would go round the epochs forever."""
        if not consumed and not taken:
            raise ValueError(
                f"rank {rank}'s share of the data holds fewer than stage.batch_size={batch_size} rows: "
                "lower the batch size or the number of workers"
            )

    def rows(self, epoch: int, rank: int, world: int, taken: Sequence[Interval] = ()) -> ray.data.Dataset:
        """This rank's rows of ``epoch``, less the positions already ``taken``."""
        order = self.order
        pieces = order.pieces(epoch, order.assignment(epoch, world, taken)[rank])
        items = [
            {
                "paths": [self.files[f] for f, _ in p.groups],
                "groups": [g for _, g in p.groups],
                "seed": list(p.seed),
                "lo": p.lo,
                "hi": p.hi,
            }
            for p in pieces
        ]
        worker_data_context()
        read = partial(_read_pieces, storage=self.storage, columns=self.columns)
        return ray.data.from_items(items).map_batches(read, batch_size=1, batch_format="pyarrow")


def held_out_rows(storage: Storage, files: list[str], columns: list[str], limit: int) -> ray.data.Dataset:
    """The first ``limit`` rows of the held-out ``files``, always the same ones (read by rank 0 for its
    evaluations)."""
    worker_data_context()
    filesystem, _ = storage.pyarrow(files[0])
    paths = [storage.pyarrow(f)[1] for f in files]
    return ray.data.read_parquet(paths, filesystem=filesystem, columns=columns).limit(limit)


def worker_data_context() -> None:
    """Ray Data in a Ray Train worker: blocks in order (an epoch's order is the point), and a quiet console
    (``quiet_worker``)."""
    quiet_worker()
    ray.data.DataContext.get_current().execution_options.preserve_order = True


def _read_pieces(batch: pa.Table, *, storage: Storage, columns: list[str]) -> pa.Table:
    return pa.concat_tables([read_piece(storage, **piece, columns=columns) for piece in batch.to_pylist()])
