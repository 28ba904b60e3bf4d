"""A training stage's checkpoint, written and read here only: both training loops save, report and resume
through ``Checkpointer``.

A checkpoint is a folder: the loop's models in diffusers format (what sample, export and ``stage.resume`` read),
and ``training_state.pt``, which holds the rest of what makes a resume exact: the loop's own ``state_dict()``
(optimizers, the EMA's counters, a loss's learned parameters), the step, the epoch, every rank's random streams
(torch's CPU and CUDA ones and the loop's generator) and the positions of the epoch's order that every rank has
trained on. Rank 0 writes it; every rank reports to Ray Train at the same steps, which keeps the last
``keep_checkpoints`` of them in the run's storage.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray.train
import torch
import torch.distributed as dist

from ldm.data.epochs import Interval
from ldm.devices import restore_rng, rng_state
from pipelines.worker.data import EpochData

STATE_FILE = "training_state.pt"


class Checkpointed(Protocol):
    """What a training loop puts in a checkpoint beside the step, the data position and the random streams."""

    def save_models(self, directory: str) -> None:
        """The models, in the format the stages after training read."""

    def state_dict(self) -> dict[str, Any]:
        """The rest of the loop's state (optimizers, EMA counters, ...) that a resume loads."""


@dataclass
class Position:
    """Where a rank's training is: the optimizer step, the epoch, the positions of the epoch's order trained on
    before this attempt started (``taken``) and the rows of this rank's run trained on since (``consumed``)."""

    step: int = 0
    epoch: int = 0
    taken: list[Interval] = field(default_factory=list)
    consumed: int = 0

    def next_epoch(self) -> None:
        self.epoch, self.taken, self.consumed = self.epoch + 1, [], 0


@dataclass(frozen=True)
class Saved:
    """A checkpoint copied to a folder of this process: its models are read from ``directory``."""

    directory: str
    state: dict[str, Any]


class Checkpointer:
    """One save, one report to Ray Train and one resume for a training loop on one rank."""

    def __init__(self, stage: str, data: EpochData, device: torch.device, generator: torch.Generator | None = None):
        context = ray.train.get_context()
        self.stage, self.data, self.device, self.generator = stage, data, device, generator
        self.rank, self.world = context.get_world_rank(), context.get_world_size()

    @contextmanager
    def latest(self, resume_from: ray.train.Checkpoint | None = None) -> Iterator[Saved | None]:
        """This run's latest checkpoint (a restart after a failure, or the same command again), else
        ``resume_from`` (``stage.resume``), copied locally while the loop loads its models; None: a fresh start."""
        checkpoint = ray.train.get_checkpoint() or resume_from
        if checkpoint is None:
            yield None
            return
        with private_copy(checkpoint) as directory:
            state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
            yield Saved(directory, state)

    def resume(self, saved: Saved | None, base_seed: int) -> Position:
        """The position to go on from, and this rank's random streams continued (or seeded from ``base_seed``)."""
        state = saved.state if saved else None
        random_streams(state, self.stage, self.rank, self.world, self.device, self.generator, base_seed)
        if state is None:
            return Position()
        return Position(state["step"], state["epoch"], self.data.resumed(state, self.stage, self.rank))

    def report(self, metrics: dict[str, float], position: Position, save: bool, parts: Checkpointed) -> None:
        """Every rank reports (Ray Train needs them all); rank 0 attaches a checkpoint when ``save``, with every
        rank's random streams and the positions of the epoch's order they have trained on."""
        mine = (rng_state(self.device, self.generator), position.consumed)
        gathered = [mine] * self.world
        if save and self.world > 1:
            dist.all_gather_object(gathered, mine)
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if save and self.rank == 0:
                parts.save_models(directory)
                data = self.data.position(position.epoch, self.world, position.taken, [c for _, c in gathered])
                state = {"step": position.step, "epoch": position.epoch, "rng": [r for r, _ in gathered], "data": data}
                torch.save({**parts.state_dict(), **state}, os.path.join(directory, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report({k: float(v) for k, v in metrics.items()}, checkpoint=checkpoint)


@contextmanager
def private_copy(checkpoint: ray.train.Checkpoint) -> Iterator[str]:
    """The checkpoint downloaded into a folder of this process's own. ``Checkpoint.as_directory`` shares one
    download between the workers of a node, and a worker mapping a safetensors file there while another writes
    it dies of SIGBUS (seen when a whole worker group restarted from an S3 checkpoint)."""
    with tempfile.TemporaryDirectory(prefix="checkpoint-") as directory:
        checkpoint.to_directory(directory)
        yield directory


def random_streams(
    state: dict[str, Any] | None,
    stage: str,
    rank: int,
    world: int,
    device: torch.device,
    generator: torch.Generator | None,
    base_seed: int,
) -> None:
    """Each rank's own random streams (torch's CPU and CUDA ones, and the training's ``generator``): seeded from
    ``base_seed`` + rank on a fresh start, continued from the checkpoint's ``state`` on a resume. A checkpoint of
    another worker count, or whose streams were saved on another device type, starts them again from the seed and
    the step: the run goes on, not bit for bit, and the log says so."""
    if not state:
        restore_rng(None, device, generator, base_seed + rank)
        return
    streams = saved_streams(state)
    saved = streams[rank] if len(streams) == world else None
    if not restore_rng(saved, device, generator, base_seed + state["step"] * world + rank):
        print(
            f"{stage}: rank {rank}: the checkpoint's random streams are not this run's "
            f"({world} workers on {device.type}); they start again from the seed and the step"
        )


def saved_streams(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``rng_state`` in a checkpoint, also in the format of checkpoints written before it recorded
    the device type (train_ldm: ``rng`` held the generators' states beside ``torch_rng``; train_autoencoder:
    ``torch_rng`` and ``cuda_rng``), so that ``stage.resume`` still takes them."""
    if "torch_rng" not in state:
        return state["rng"]
    generators = state.get("rng") or [None] * len(state["torch_rng"])
    cudas = state.get("cuda_rng") or [None] * len(state["torch_rng"])
    return [
        {
            "device": "cuda" if cuda is not None or (g is not None and g.numel() == 16) else "cpu",
            "cpu": cpu,
            "cuda": cuda,
            "generator": g,
        }
        for cpu, cuda, g in zip(state["torch_rng"], cudas, generators)
    ]
