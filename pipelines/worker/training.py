"""What both training loops share besides the checkpoint: the window of steps a log line averages, the cadence of
logs and checkpoints, and the check that DDP kept the replicas equal."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def due(step: int, every: int, steps: int) -> bool:
    """Whether a cadence of ``every`` steps falls at ``step``; everything is due at the last step."""
    return step % every == 0 or step == steps


class Window:
    """The steps since the last log: their summed values and samples, and how long they took. Time spent on
    what is not training (counting a step's FLOPs) is taken out of the rates with ``exclude``."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.samples, self.data_wait = 0, 0, 0.0
        self.start = time.perf_counter()

    def add(self, samples: int, values: dict[str, float]) -> None:
        self.steps += 1
        self.samples += samples
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value

    def exclude(self, seconds: float) -> None:
        self.start += seconds

    def mean(self, name: str) -> float:
        return self.sums.get(name, float("nan")) / max(1, self.steps)

    def metrics(self) -> dict[str, float]:
        """``train/<value>`` means over the window, and its rates."""
        elapsed = time.perf_counter() - self.start
        return {
            **{f"train/{name}": total / max(1, self.steps) for name, total in self.sums.items()},
            "train/samples_per_s": self.samples / elapsed,
            "train/steps_per_s": self.steps / elapsed,
            "train/data_wait_fraction": self.data_wait / elapsed,
        }


def timed(batches: Iterable[T], window: Window) -> Iterator[T]:
    """``batches``, with the time spent waiting for each added to the window's ``data_wait``."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        batch = next(iterator, None)
        window.data_wait += time.perf_counter() - start
        if batch is None:
            return
        yield batch


@contextmanager
def evaluation_mode(*modules: torch.nn.Module | None) -> Iterator[None]:
    """The modules in eval mode for the block, then each back in the mode it had (a frozen τθ stays in eval)."""
    modes = [(m, m.training) for m in modules if m is not None]
    for module, _ in modes:
        module.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.train(mode)


def parameter_spread(parameters: Iterable[torch.nn.Parameter], world: int) -> float:
    """The largest difference of a parameter checksum between ranks: 0 when the replicas are equal."""
    total = torch.stack([p.detach().double().sum() for p in parameters]).sum()
    if world == 1:
        return 0.0
    sums = [torch.zeros_like(total) for _ in range(world)]
    dist.all_gather(sums, total)
    return float(max(sums) - min(sums))
