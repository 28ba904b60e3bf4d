"""Batches of consecutive epochs through one bounded queue, filled by a background thread.

A data loader that starts each epoch only when the trainer asks for it makes the trainer wait, at every epoch
boundary, for everything that starting costs: with Ray Data's split streams, a barrier across the workers, a
new executor, read tasks, a shuffle buffer filling (~10 s measured on 2 cores). Here the thread starts the next
epoch as soon as it has handed over the last one's batches, while the trainer still works through the queue.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable

END_OF_EPOCH = None


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
