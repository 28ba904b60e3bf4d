"""EpochStream: epochs in order, the next one started before the trainer reaches the boundary, errors raised."""

import threading

import pytest

from ldm.data.epochs import END_OF_EPOCH, EpochStream


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
