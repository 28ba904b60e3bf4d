"""What both Ray Train loops share inside the workers: each epoch's rows in a fixed order (``EpochData``),
logging to the MLflow run the driver opened for the stage, and the check that DDP kept the replicas equal.

MLflow's client is imported when a worker first logs, not when this module loads: the ranks and Ray Data
tasks that never log do not pay for its import, and no worker imports the driver's tracking module.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

import pyarrow as pa
import ray.data
import ray.train
import torch
import torch.distributed as dist
from PIL import Image

from ldm.data.epochs import EpochOrder, Interval, read_piece
from ldm.devices import restore_rng
from ldm.storage import Storage


@dataclass(frozen=True)
class RunTarget:
    """The driver's MLflow run for the stage, spelled so that any worker process can reach it."""

    tracking_uri: str
    run_id: str


class RunLogger:
    """A client bound to one run: workers do not share the driver's active-run state."""

    def __init__(self, target: RunTarget):
        import mlflow  # here, not at the top: see the module's docstring

        self.client = mlflow.MlflowClient(tracking_uri=target.tracking_uri)
        self.entities = mlflow.entities
        self.run_id = target.run_id

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        logged = [self.entities.Metric(k, float(v), now, step) for k, v in metrics.items() if k != "step"]
        self.client.log_batch(self.run_id, metrics=logged)

    def params(self, params: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=[self.entities.Param(k, str(v)) for k, v in params.items()])

    def image(self, image: Image.Image, key: str, step: int) -> None:
        """An image in the series ``key``: the UI's Images tab steps through a series by training step."""
        self.client.log_image(self.run_id, image, key=key, step=step)

    def text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)


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
                f"{stage}: rank {rank}: the checkpoint's epoch order is not this data's; epoch {state['epoch']} starts from its beginning"
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


def worker_data_context() -> None:
    """Ray Data in a Ray Train worker: blocks in order (an epoch's order is the point), and no progress bars (no
    terminal here: they only flood the driver's log)."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False


def _read_pieces(batch: pa.Table, *, storage: Storage, columns: list[str]) -> pa.Table:
    return pa.concat_tables([read_piece(storage, **piece, columns=columns) for piece in batch.to_pylist()])


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
            f"{stage}: rank {rank}: the checkpoint's random streams are not this run's ({world} workers on {device.type}); "
            "they start again from the seed and the step"
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


def gather_for_checkpoint(mine: tuple, save: bool, world: int) -> list[tuple]:
    """Every rank's ``mine`` (its RNG states and rows consumed) when a checkpoint is due; only rank 0 writes it."""
    gathered = [mine] * world
    if save and world > 1:
        dist.all_gather_object(gathered, mine)
    return gathered


def parameter_spread(parameters: Iterable[torch.nn.Parameter], world: int) -> float:
    """The largest difference of a parameter checksum between ranks: 0 when the replicas are equal."""
    total = torch.stack([p.detach().double().sum() for p in parameters]).sum()
    if world == 1:
        return 0.0
    sums = [torch.zeros_like(total) for _ in range(world)]
    dist.all_gather(sums, total)
    return float(max(sums) - min(sums))
