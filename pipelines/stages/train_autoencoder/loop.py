"""The training loop of stage=train_autoencoder, run by every Ray Train worker: read it top to bottom.

Two optimizers as in the paper: the autoencoder (plus the loss's learned log-variance) and the PatchGAN
discriminator, which starts at ``disc_start``. The autoencoder is DDP-wrapped; the loss module's parameters
(discriminator, log-variance) have their gradients averaged across workers by hand, because the
discriminator runs twice per step (generator and discriminator terms), which DDP does not allow. Every
replica is built from the same seed, so averaged gradients keep them equal (``ddp/parameter_spread``).
Rank 0 checkpoints (``pipelines.worker.checkpoint``: the model in diffusers format, the loss's parameters and
both optimizers), evaluates on the held-out images and logs to the MLflow run the driver opened. A restart
continues the epoch on exactly the rows not yet trained on.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ldm.devices import autocast as autocast_for
from ldm.devices import autocast_dtype, enable_tf32, restore_optimizer
from ldm.flops import peak_flops, performance, step_flops
from ldm.grids import pair_grid
from ldm.losses.first_stage import FirstStageLoss, LossWeights
from ldm.losses.lpips import load_lpips
from ldm.lr_schedule import learning_rate, set_learning_rate
from ldm.metrics.reconstruction import evaluate_reconstruction
from ldm.models.first_stage import (
    FirstStage,
    Reconstruct,
    build_first_stage,
    factor,
    kind,
    last_layer,
    load_first_stage,
)
from ldm.models.presets import first_stage_preset
from ldm.storage import Storage
from pipelines.schema import TrainAutoencoder
from pipelines.stages.train_autoencoder import remote
from pipelines.worker.checkpoint import Checkpointer, Saved
from pipelines.worker.console import ProgressLine, quiet_worker
from pipelines.worker.data import EpochData, held_out_rows
from pipelines.worker.run_logger import RunLogger, RunTarget
from pipelines.worker.training import Window, due, parameter_spread, timed

STAGE = "train_autoencoder"
MODEL_DIR = "model"  # inside a checkpoint: the autoencoder as diffusers saves it


@dataclass(frozen=True)
class LoopConfig:
    """What every worker gets: the stage's typed config and what the driver resolved for it."""

    settings: TrainAutoencoder
    data: EpochData  # the prepared training images, and each epoch's order of them
    held_out: list[str]  # prepare's held-out rows: the images evaluations measure (never trained on)
    resolution: int
    pretrained: str | None  # the first stage to fine-tune, as every process spells it (or None: a preset)
    storage: Storage
    run: RunTarget


def train_loop(config: LoopConfig) -> None:
    """What every Ray Train worker runs: build (or resume), then train to ``stage.steps``."""
    Trainer(config).train()


@dataclass
class Parts:
    """What trains: the autoencoder, its loss (with the discriminator and the learned log-variance) and their two
    optimizers; what a checkpoint holds of them (``Checkpointed``)."""

    autoencoder: FirstStage
    loss: FirstStageLoss
    ae_optimizer: torch.optim.Adam
    d_optimizer: torch.optim.Adam

    def save_models(self, directory: str) -> None:
        self.autoencoder.save_pretrained(os.path.join(directory, MODEL_DIR))

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss.state_dict(),
            "ae_optimizer": self.ae_optimizer.state_dict(),
            "d_optimizer": self.d_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.loss.load_state_dict(state["loss"])
        restore_optimizer(self.ae_optimizer, state["ae_optimizer"], device)
        restore_optimizer(self.d_optimizer, state["d_optimizer"], device)


class Trainer:
    """One worker's training: ``train()`` reads top to bottom; each step it calls is a method below."""

    def __init__(self, config: LoopConfig):
        quiet_worker()
        self.config, self.settings = config, config.settings
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(self.settings.seed)  # every replica of the autoencoder and discriminator starts the same
        self.checkpointer = Checkpointer(STAGE, config.data, self.device)
        with self.checkpointer.latest() as saved:
            model = _first_stage(config, saved)
        perceptual = load_lpips(self.settings.lpips_weights, config.storage)
        self.parts = training_parts(self.settings, model, perceptual, self.device, saved.state if saved else {})
        self.position = self.checkpointer.resume(saved, self.settings.seed)  # each rank's posterior noise
        self.parts.autoencoder.train()  # from_pretrained (a checkpoint) returns eval mode: some layers differ
        self.network = ray.train.torch.prepare_model(Reconstruct(self.parts.autoencoder))
        enable_tf32(self.device)
        precision = autocast_dtype(self.device, str(self.settings.precision), "stage.precision")
        self.autocast, self.peak = autocast_for(self.device, precision), peak_flops(self.device, precision)
        self.tracker = RunLogger(config.run) if self.rank == 0 else None
        self.validation = _validation_batches(config) if self.rank == 0 else None
        self.window = Window()
        self.progress = ProgressLine(STAGE, self.settings.steps, self.position.step, enabled=self.rank == 0)
        self.flops, self.disc_counted = None, False  # one worker's step (autoencoder and discriminator)

    def train(self) -> None:
        """Each epoch is one pass over this worker's run of the epoch's order."""
        while self.position.step < self.settings.steps:
            for batch in timed(self.epoch_batches(), self.window):
                self.count_flops(batch["pixels"])
                logs = self.train_step(batch["pixels"])
                self.progress.update(self.position.step, logs["loss"])
                self.log_evaluate_checkpoint()
                if self.position.step >= self.settings.steps:
                    break
            else:  # the epoch's run is exhausted
                self.config.data.check_share(
                    self.position.consumed, self.position.taken, self.rank, self.settings.batch_size
                )
                self.position.next_epoch()

    def epoch_batches(self):
        """This rank's crops of the current epoch (less what was trained on before a restart), on its device."""
        settings, position = self.settings, self.position
        crops = partial(
            remote.pixels,
            resolution=self.config.resolution,
            seed=(settings.seed, position.epoch),
            flip=settings.random_flip,
            side=settings.crop,
        )
        rows = self.config.data.rows(position.epoch, self.rank, self.world, position.taken)
        images = rows.map_batches(crops, num_cpus=settings.resources.num_cpus_per_decode_task)
        return images.iter_torch_batches(batch_size=settings.batch_size, device=self.device, drop_last=True)

    def count_flops(self, images: torch.Tensor) -> None:
        """One worker's step, counted on the first step and again on the first with the discriminator."""
        step, disc_start = self.position.step, self.settings.loss.disc_start
        if self.flops is not None and (self.disc_counted or step < disc_start):
            return
        counting = time.perf_counter()
        parts = self.parts
        run = partial(_losses, parts.autoencoder, parts.loss, images, step, self.autocast)
        self.flops = step_flops(run, [parts.autoencoder, parts.loss])
        self.disc_counted = step >= disc_start
        self.window.exclude(time.perf_counter() - counting)  # not in the rates

    def train_step(self, images: torch.Tensor) -> dict[str, float]:
        """The autoencoder's update, then the discriminator's (from ``loss.disc_start``); the step's losses."""
        parts, opt, step = self.parts, self.settings.optimizer, self.position.step
        schedule = {
            "schedule": opt.schedule,
            "warmup_steps": opt.warmup_steps,
            "final_ratio": opt.final_ratio,
            "total_steps": self.settings.steps,
        }
        for optimizer, base in ((parts.ae_optimizer, opt.lr), (parts.d_optimizer, opt.disc_lr)):
            set_learning_rate(optimizer, learning_rate(step, base, **schedule))
        with self.autocast:
            reconstructions, encoded = self.network(images)
            ae_loss, logs = parts.loss.generator(images, reconstructions, encoded, step, last_layer(parts.autoencoder))
        parts.ae_optimizer.zero_grad(set_to_none=True)
        ae_loss.backward()
        _average_gradients([parts.loss.logvar] if parts.loss.logvar is not None else [], self.world)
        parts.ae_optimizer.step()
        with self.autocast:
            d_loss, d_logs = parts.loss.discriminator_loss(images, reconstructions, step)
        if d_loss is not None:
            parts.d_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            _average_gradients(list(parts.loss.discriminator.parameters()), self.world)
            parts.d_optimizer.step()
        self.position.step += 1
        self.position.consumed += images.shape[0]
        values = {"loss": ae_loss.item(), **logs, **d_logs}
        self.window.add(images.shape[0] * self.world, values)
        return values

    def log_evaluate_checkpoint(self) -> None:
        """What is due at this step: the window's metrics, the held-out evaluation (rank 0), a checkpoint."""
        settings, step = self.settings, self.position.step
        log, save = due(step, settings.log_every, settings.steps), due(step, settings.checkpoint_every, settings.steps)
        metrics: dict[str, float] = {"step": step}
        if log:
            metrics.update(self.window_metrics())
            self.window.restart()
        if self.rank == 0:
            if due(step, settings.eval_every, settings.steps):
                metrics.update(
                    _evaluate(self.parts.autoencoder, self.validation, self.tracker, step, settings.scene_fidelity)
                )
            if len(metrics) > 1:
                self.tracker.metrics(metrics, step)
        if log or save:  # every rank reports at the same steps: Ray Train gathers the reports
            self.checkpointer.report(metrics, self.position, save, self.parts)

    def window_metrics(self) -> dict[str, float]:
        metrics = self.window.metrics()
        metrics.update(performance(self.flops, metrics["train/steps_per_s"], self.peak))
        metrics["train/lr"] = self.parts.ae_optimizer.param_groups[0]["lr"]
        if self.position.step == self.settings.steps:  # the autoencoder, its log-variance, the discriminator
            parameters = [*self.parts.autoencoder.parameters(), *self.parts.loss.parameters()]
            metrics["ddp/parameter_spread"] = parameter_spread(parameters, self.world)
        return metrics


def _first_stage(config: LoopConfig, saved: Saved | None) -> FirstStage:
    """The checkpoint's autoencoder, the pretrained one to fine-tune, or a new one from the preset."""
    settings = config.settings
    if saved is not None:
        model = load_first_stage(os.path.join(saved.directory, MODEL_DIR))
    elif config.pretrained:
        model = load_first_stage(config.pretrained, config.storage)
    else:
        preset = first_stage_preset(
            settings.model.preset, settings.model.overrides, latent_channels=settings.model.latent_channels
        )
        model = build_first_stage(preset, settings.model.logvar_bias)
    if settings.crop and settings.crop % factor(model):  # a pretrained one's (the stage checked a preset's)
        raise ValueError(
            f"stage.crop={settings.crop} is not a multiple of the first stage's downsampling factor {factor(model)}"
        )
    return model


def training_parts(
    settings: TrainAutoencoder, model: FirstStage, perceptual, device: torch.device, state: dict[str, Any]
) -> Parts:
    """The autoencoder and its loss on ``device``, their two optimizers, and a checkpoint's ``state`` loaded into
    them (empty: a fresh start), in that order: torch puts Adam's moments on their parameters' device as it
    loads them, so a model moved afterwards would step with its moments left on the CPU."""
    opt = settings.optimizer
    loss = FirstStageLoss(kind(model), LossWeights(**asdict(settings.loss)), perceptual, settings.disc_layers).to(
        device
    )
    autoencoder = model.to(device)
    extra = [loss.logvar] if loss.logvar is not None else []
    ae_optimizer = torch.optim.Adam([*autoencoder.parameters(), *extra], lr=opt.lr, betas=tuple(opt.betas))
    d_optimizer = torch.optim.Adam(loss.discriminator.parameters(), lr=opt.disc_lr, betas=tuple(opt.betas))
    parts = Parts(autoencoder, loss, ae_optimizer, d_optimizer)
    if state:
        parts.load_state_dict(state, device)
    return parts


def _losses(autoencoder, loss: FirstStageLoss, images: torch.Tensor, step: int, autocast) -> None:
    """A step's forwards and backwards, on the bare autoencoder, without the optimizers: what MFU counts."""
    with autocast:
        reconstructions, encoded = Reconstruct(autoencoder)(images)
        ae_loss, _ = loss.generator(images, reconstructions, encoded, step, last_layer(autoencoder))
    ae_loss.backward()
    with autocast:
        d_loss, _ = loss.discriminator_loss(images, reconstructions, step)
    if d_loss is not None:
        d_loss.backward()


def _average_gradients(parameters: list[torch.nn.Parameter], world: int) -> None:
    if world == 1:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad /= world


def _validation_batches(config: LoopConfig) -> list[torch.Tensor]:
    """The held-out images (center crops), kept in memory: at most stage.validation_images of them."""
    settings = config.settings
    if not config.held_out:
        return []
    rows = held_out_rows(config.storage, config.held_out, ["key", "image"], settings.validation_images)
    crops = partial(remote.pixels, resolution=config.resolution, seed=None, flip=False)
    images = rows.map_batches(crops, num_cpus=settings.resources.num_cpus_per_decode_task)
    # Copies: Ray Data's batches are read-only.
    return [
        torch.tensor(b["pixels"]) for b in images.iter_batches(batch_size=settings.batch_size, batch_format="numpy")
    ]


def _evaluate(
    autoencoder, validation: list[torch.Tensor], tracker: RunLogger, step: int, scenes: bool
) -> dict[str, float]:
    if not validation:
        return {}
    device = next(autoencoder.parameters()).device
    with torch.random.fork_rng(devices=[]):  # evaluating does not move the training's random stream
        metrics = evaluate_reconstruction(autoencoder, [b.to(device) for b in validation], scenes)
        with torch.no_grad():
            originals = validation[0][:8].to(device)
            reconstructions, _ = Reconstruct(autoencoder)(originals, sample=False)
    tracker.image(pair_grid(originals, reconstructions), "reconstructions", step)
    return metrics.as_dict("val/")
