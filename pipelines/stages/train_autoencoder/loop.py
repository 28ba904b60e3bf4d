"""The training loop of stage=train_autoencoder, run by every Ray Train worker: read it top to bottom.

Two optimizers as in the paper: the autoencoder (plus the loss's learned log-variance) and the PatchGAN
discriminator, which starts at ``disc_start``. The autoencoder is DDP-wrapped; the loss module's parameters
(discriminator, log-variance) have their gradients averaged across workers by hand, because the
discriminator runs twice per step (generator and discriminator terms), which DDP does not allow. Every
replica is built from the same seed, so averaged gradients keep them equal (``ddp/parameter_spread``).
Rank 0 checkpoints (the model in diffusers format + the training state: optimizers, step, every rank's RNG,
the position in the epoch's order every rank has trained up to), evaluates on the held-out images and logs to
the MLflow run the driver opened. A restart continues the epoch on exactly the rows not yet trained on.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ldm.devices import autocast as autocast_for
from ldm.devices import autocast_dtype, enable_tf32, restore_optimizer, rng_state
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
from pipelines.train_worker import (
    EpochData,
    RunLogger,
    RunTarget,
    gather_for_checkpoint,
    parameter_spread,
    private_copy,
    random_streams,
)

MODEL_DIR = "model"  # inside a checkpoint: the autoencoder as diffusers saves it
STATE_FILE = "training_state.pt"


@dataclass(frozen=True)
class LoopConfig:
    """What every worker gets: the stage's typed config and what the driver resolved for it."""

    settings: TrainAutoencoder
    data: EpochData  # the prepared training images, and each epoch's order of them
    resolution: int
    pretrained: str | None  # the first stage to fine-tune, as every process spells it (or None: a preset)
    storage: Storage
    run: RunTarget


def train_loop(config: LoopConfig) -> None:
    settings, opt = config.settings, config.settings.optimizer
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(settings.seed)  # every replica of the autoencoder and of the discriminator starts the same
    device = ray.train.torch.get_device()

    # -- model, loss, optimizers, and the state to resume from ------------------------------------------------
    checkpoint = ray.train.get_checkpoint()
    state: dict[str, Any] = {}
    if checkpoint is not None:
        with private_copy(checkpoint) as directory:
            model = load_first_stage(os.path.join(directory, MODEL_DIR))
            state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    elif config.pretrained:
        model = load_first_stage(config.pretrained, config.storage)
    else:
        model = build_first_stage(
            first_stage_preset(
                settings.model.preset, settings.model.overrides, latent_channels=settings.model.latent_channels
            ),
            settings.model.logvar_bias,
        )
    if settings.crop and settings.crop % factor(model):  # a pretrained one's (the stage checked a preset's)
        raise ValueError(
            f"stage.crop={settings.crop} is not a multiple of the first stage's downsampling factor {factor(model)}"
        )
    perceptual = load_lpips(settings.lpips_weights, config.storage)
    autoencoder, loss, ae_optimizer, d_optimizer = training_parts(settings, model, perceptual, device, state)
    extra = [loss.logvar] if loss.logvar is not None else []
    step, epoch, taken = 0, 0, []  # taken: positions of the epoch's order trained on before this attempt
    if state:
        step, epoch = state["step"], state["epoch"]
        taken = config.data.resumed(state, "train_autoencoder", rank)
    random_streams(state, "train_autoencoder", rank, world, device, None, settings.seed)  # each rank's posterior noise
    autoencoder.train()  # from_pretrained (a checkpoint) returns eval mode, which runs some layers differently
    network = ray.train.torch.prepare_model(Reconstruct(autoencoder))
    enable_tf32(device)
    precision = autocast_dtype(device, str(settings.precision), "stage.precision")
    autocast = autocast_for(device, precision)

    tracker = RunLogger(config.run) if rank == 0 else None
    validation = _validation_batches(settings.batch_size) if rank == 0 else None
    sums: dict[str, float] = {}
    started, seen, window_steps = time.time(), 0, 0
    peak = peak_flops(device, precision)
    flops, disc_counted = None, False  # one worker's step (autoencoder and discriminator)

    # -- the loop: each epoch is one pass over this worker's run of the epoch's order -------------------------
    schedule = {
        "schedule": opt.schedule,
        "warmup_steps": opt.warmup_steps,
        "final_ratio": opt.final_ratio,
        "total_steps": settings.steps,
    }
    while step < settings.steps:
        consumed = 0  # rows of this epoch's run trained on in this attempt
        crops = partial(
            remote.pixels,
            resolution=config.resolution,
            seed=(settings.seed, epoch),
            flip=settings.random_flip,
            side=settings.crop,
        )
        images_of_epoch = config.data.rows(epoch, rank, world, taken).map_batches(
            crops, num_cpus=settings.resources.num_cpus_per_decode_task
        )
        for batch in images_of_epoch.iter_torch_batches(batch_size=settings.batch_size, device=device, drop_last=True):
            images = batch["pixels"]
            # Counted on the first step, and again on the first with the discriminator (from loss.disc_start).
            if flops is None or (not disc_counted and step >= settings.loss.disc_start):
                counting = time.time()
                flops = step_flops(partial(_losses, autoencoder, loss, images, step, autocast), [autoencoder, loss])
                disc_counted, started = (
                    step >= settings.loss.disc_start,
                    started + time.time() - counting,
                )  # not in images/s
            for optimizer, base in ((ae_optimizer, opt.lr), (d_optimizer, opt.disc_lr)):
                set_learning_rate(optimizer, learning_rate(step, base, **schedule))
            with autocast:
                reconstructions, encoded = network(images)
                ae_loss, logs = loss.generator(images, reconstructions, encoded, step, last_layer(autoencoder))
            ae_optimizer.zero_grad(set_to_none=True)
            ae_loss.backward()
            _average_gradients(extra, world)
            ae_optimizer.step()

            with autocast:
                d_loss, d_logs = loss.discriminator_loss(images, reconstructions, step)
            if d_loss is not None:
                d_optimizer.zero_grad(set_to_none=True)
                d_loss.backward()
                _average_gradients(list(loss.discriminator.parameters()), world)
                d_optimizer.step()
            step += 1
            window_steps += 1
            consumed += images.shape[0]
            seen += images.shape[0] * world
            for name, value in {"loss": ae_loss.item(), **logs, **d_logs}.items():
                sums[name] = sums.get(name, 0.0) + value

            last = step == settings.steps
            log, save = step % settings.log_every == 0 or last, step % settings.checkpoint_every == 0 or last
            metrics: dict[str, float] = {"step": step}
            if log:
                metrics.update({f"train/{k}": v / settings.log_every for k, v in sums.items()})
                metrics["train/images_per_s"] = seen / (time.time() - started)
                metrics.update(performance(flops, window_steps / (time.time() - started), peak))
                metrics["train/lr"] = ae_optimizer.param_groups[0]["lr"]
                if last:  # the autoencoder, its log-variance and the discriminator: equal on every rank
                    metrics["ddp/parameter_spread"] = parameter_spread(
                        [*autoencoder.parameters(), *loss.parameters()], world
                    )
                sums, started, seen, window_steps = {}, time.time(), 0, 0
            if rank == 0:
                if step % settings.eval_every == 0 or last:
                    metrics.update(_evaluate(autoencoder, validation, tracker, step, settings.scene_fidelity))
                if len(metrics) > 1:
                    tracker.metrics(metrics, step)
            if log or save:  # every rank reports at the same steps: Ray Train gathers the reports
                position = {"epoch": epoch, "taken": taken, "consumed": consumed}
                _report(
                    metrics,
                    save,
                    autoencoder,
                    loss,
                    ae_optimizer,
                    d_optimizer,
                    step,
                    position,
                    world,
                    rank,
                    config.data,
                )
            if step >= settings.steps:
                break
        else:  # the epoch's run is exhausted
            config.data.check_share(consumed, taken, rank, settings.batch_size)
            epoch, taken = epoch + 1, []


def training_parts(
    settings: TrainAutoencoder, model: FirstStage, perceptual, device: torch.device, state: dict[str, Any]
) -> tuple[FirstStage, FirstStageLoss, torch.optim.Adam, torch.optim.Adam]:
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
    if state:
        loss.load_state_dict(state["loss"])
        restore_optimizer(ae_optimizer, state["ae_optimizer"], device)
        restore_optimizer(d_optimizer, state["d_optimizer"], device)
    return autoencoder, loss, ae_optimizer, d_optimizer


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


def _report(
    metrics,
    save: bool,
    autoencoder,
    loss,
    ae_optimizer,
    d_optimizer,
    step: int,
    position: dict[str, Any],
    world: int,
    rank: int,
    data: EpochData,
) -> None:
    """Every worker reports (Ray Train needs them all); rank 0 attaches the checkpoint when one is due, with every
    rank's RNG and the positions of the epoch's order they have trained on."""
    gathered = gather_for_checkpoint(
        (rng_state(next(autoencoder.parameters()).device), position["consumed"]), save, world
    )
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if save and rank == 0:
            autoencoder.save_pretrained(os.path.join(directory, MODEL_DIR))
            torch.save(
                {
                    "loss": loss.state_dict(),
                    "ae_optimizer": ae_optimizer.state_dict(),
                    "d_optimizer": d_optimizer.state_dict(),
                    "step": step,
                    "epoch": position["epoch"],
                    "rng": [r for r, _ in gathered],
                    "data": data.position(position["epoch"], world, position["taken"], [c for _, c in gathered]),
                },
                os.path.join(directory, STATE_FILE),
            )
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({k: float(v) for k, v in metrics.items()}, checkpoint=checkpoint)


def _validation_batches(batch_size: int) -> list[torch.Tensor]:
    """The held-out images (center crops), kept in memory: at most stage.validation_images of them."""
    images = []
    for batch in ray.train.get_dataset_shard("validation").iter_batches(batch_size=batch_size, batch_format="numpy"):
        images.append(torch.from_numpy(batch["pixels"]))
    return images


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
