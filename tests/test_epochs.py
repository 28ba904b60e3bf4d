"""EpochOrder: each epoch's order a function of (row groups, seed, epoch), split equally, continued exactly from a
recorded position with any worker count, read back from parquet row groups. EpochStream: epochs in order, the
next one started before the trainer reaches the boundary, errors raised."""

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ldm.data.epochs import END_OF_EPOCH, EpochOrder, EpochStream, read_piece
from ldm.storage import Storage

GROUPS = [[5, 7], [3], [10, 10, 2], [0], [4], [9]]


@pytest.fixture()
def files(tmp_path):
    """One parquet file per entry of GROUPS, with those row groups, rows keyed by (file, row group, row)."""
    paths = []
    for f, groups in enumerate(GROUPS):
        keys = [f"{f}.{g}.{i}" for g, n in enumerate(groups) for i in range(n)]
        path = tmp_path / f"part-{f}.parquet"
        with pq.ParquetWriter(path, pa.schema([("key", pa.string())])) as writer:
            start = 0
            for n in groups:
                writer.write_table(
                    pa.table({"key": pa.array(keys[start : start + n], pa.string())}), row_group_size=max(1, n)
                )
                start += n
        paths.append(str(path))
    return paths


def read(order, paths, epoch, positions):
    return [
        k
        for p in order.pieces(epoch, positions)
        for k in read_piece(
            Storage(root="/"), [paths[f] for f, _ in p.groups], [g for _, g in p.groups], p.seed, p.lo, p.hi, ["key"]
        )["key"].to_pylist()
    ]


def test_every_worker_count_reads_each_row_at_most_once_in_equal_runs(files):
    order = EpochOrder(GROUPS, seed=3, window_rows=8)
    assert order.rows == 50
    for world in (1, 2, 3, 4):
        runs = [read(order, files, 1, positions) for positions in order.assignment(1, world)]
        everything = [k for run in runs for k in run]
        assert len({len(run) for run in runs}) == 1 and len(everything) == len(set(everything)) > 50 - world
    assert read(order, files, 1, [(0, 50)]) != read(order, files, 2, [(0, 50)])  # another order each epoch
    assert read(order, files, 1, [(0, 50)]) == read(
        EpochOrder(GROUPS, 3, 8), files, 1, [(0, 50)]
    )  # and the same one again


def test_a_restart_continues_each_run_exactly_with_the_same_or_another_worker_count(files):
    order = EpochOrder(GROUPS, seed=0, window_rows=8)
    full = [read(order, files, 4, positions) for positions in order.assignment(4, 2)]
    taken = order.taken_after(4, 2, [], [9, 9])  # workers step together: each has trained on as many rows
    again = [read(order, files, 4, positions) for positions in order.assignment(4, 2, taken)]
    assert again == [full[0][9:], full[1][9:]]  # the same workers: exactly where each stopped
    three = [read(order, files, 4, positions) for positions in order.assignment(4, 3, taken)]
    trained = full[0][:9] + full[1][:9] + [k for run in three for k in run]
    assert len(trained) == len(set(trained)) and len(trained) > 50 - 3  # another count: the rest once each
    # A second restart on top of the first.
    taken = order.taken_after(4, 3, taken, [2, 2, 2])
    rest = [k for positions in order.assignment(4, 1, taken) for k in read(order, files, 4, positions)]
    assert sorted(full[0][:9] + full[1][:9] + [k for run in three for k in run[:2]] + rest) == sorted(
        {f"{f}.{g}.{i}" for f, groups in enumerate(GROUPS) for g, n in enumerate(groups) for i in range(n)}
    )


def test_epochs_come_in_order_and_the_next_starts_while_the_last_batches_wait():
    started = {e: threading.Event() for e in range(4)}

    def epochs(e):
        started[e].set()
        yield from (f"{e}.{i}" for i in range(2))

    stream = EpochStream(epochs, first=1, depth=4)
    assert [stream.next(), stream.next()] == ["1.0", "1.1"]
    # The trainer has not asked past epoch 1's last batch, and epoch 2 is already being read.
    assert started[2].wait(timeout=10)
    assert [stream.next() for _ in range(4)] == [END_OF_EPOCH, "2.0", "2.1", END_OF_EPOCH]
    stream.close()
    assert not started[0].is_set()


def test_an_error_in_the_data_source_reaches_the_trainer():
    def epochs(e):
        yield "a"
        raise OSError("the shard is gone")

    stream = EpochStream(epochs, first=0, depth=2)
    assert stream.next() == "a"
    with pytest.raises(OSError, match="the shard is gone"):
        stream.next()
