"""The training loop of stage=train_autoencoder, run by every Ray Train worker: read it top to bottom.

Two optimizers as in the paper: the autoencoder (plus the loss's learned log-variance) and the PatchGAN
discriminator, which starts at ``disc_start``. The autoencoder is DDP-wrapped; the loss module's parameters
(discriminator, log-variance) have their gradients averaged across workers by hand, because the
discriminator runs twice per step (generator and discriminator terms), which DDP does not allow.
Rank 0 checkpoints (the model in diffusers format + the training state), evaluates on the held-out images and
logs to the MLflow run the driver opened.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ldm.losses.first_stage import FirstStageLoss, LossWeights
from ldm.losses.lpips import load_lpips
from ldm.lr_schedule import learning_rate, set_learning_rate
from ldm.grids import pair_grid
from ldm.metrics.reconstruction import evaluate_reconstruction
from ldm.models.first_stage import Reconstruct, build_first_stage, kind, last_layer, load_first_stage, preset
from pipelines.run_logger import RunLogger

MODEL_DIR = "model"  # inside a checkpoint: the autoencoder as diffusers saves it
STATE_FILE = "training_state.pt"


def train_loop(config: dict[str, Any]) -> None:
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config["seed"] + rank)
    device = ray.train.torch.get_device()

    # -- model, loss, optimizers, and the state to resume from ------------------------------------------------
    checkpoint = ray.train.get_checkpoint()
    state: dict[str, Any] = {}
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            model = load_first_stage(os.path.join(directory, MODEL_DIR))
            state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False)
    elif config["pretrained"]:
        model = load_first_stage(config["pretrained"], config["storage"])
    else:
        model = build_first_stage(preset(config["preset"], **config["preset_overrides"]), config["logvar_bias"])
    perceptual = load_lpips(config["lpips_weights"], config["storage"])
    loss = FirstStageLoss(kind(model), LossWeights(**config["loss"]), perceptual, config["disc_layers"]).to(device)
    extra = [loss.logvar] if loss.logvar is not None else []
    betas = tuple(config["betas"])
    ae_optimizer = torch.optim.Adam([*model.parameters(), *extra], lr=config["lr"], betas=betas)
    d_optimizer = torch.optim.Adam(loss.discriminator.parameters(), lr=config["disc_lr"], betas=betas)
    step = 0
    if state:
        loss.load_state_dict(state["loss"])
        ae_optimizer.load_state_dict(state["ae_optimizer"])
        d_optimizer.load_state_dict(state["d_optimizer"])
        step = state["step"]
    network = ray.train.torch.prepare_model(Reconstruct(model))
    autoencoder = model.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and config["bf16"] else nullcontext()

    tracker = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    validation = _validation_batches(config) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    sums: dict[str, float] = {}
    started, seen = time.time(), 0

    # -- the loop ---------------------------------------------------------------------------------------------
    while step < config["steps"]:
        for batch in shard.iter_torch_batches(batch_size=config["batch_size"], device=device, drop_last=True):
            images = batch["pixels"]
            for optimizer, base in ((ae_optimizer, config["lr"]), (d_optimizer, config["disc_lr"])):
                set_learning_rate(optimizer, learning_rate(step, base, total_steps=config["steps"], **config["schedule"]))
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
            seen += images.shape[0] * world
            for name, value in {"loss": ae_loss.item(), **logs, **d_logs}.items():
                sums[name] = sums.get(name, 0.0) + value

            if step % config["log_every"] == 0 or step == config["steps"]:
                metrics = {f"train/{k}": v / config["log_every"] for k, v in sums.items()}
                metrics["train/images_per_s"] = seen / (time.time() - started)
                metrics["train/lr"] = ae_optimizer.param_groups[0]["lr"]
                metrics["step"] = step
                sums, started, seen = {}, time.time(), 0
                checkpoint_now = step % config["checkpoint_every"] == 0 or step == config["steps"]
                if rank == 0:
                    if step % config["eval_every"] == 0 or step == config["steps"]:
                        metrics.update(_evaluate(autoencoder, validation, tracker, step))
                    tracker.metrics(metrics, step)
                _report(metrics, checkpoint_now and rank == 0, autoencoder, loss, ae_optimizer, d_optimizer, step)
            if step >= config["steps"]:
                break


def _average_gradients(parameters: list[torch.nn.Parameter], world: int) -> None:
    if world == 1:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad /= world


def _report(metrics, save: bool, autoencoder, loss, ae_optimizer, d_optimizer, step: int) -> None:
    """Every worker reports (Ray Train needs them all); rank 0 attaches the checkpoint when one is due."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if save:
            autoencoder.save_pretrained(os.path.join(directory, MODEL_DIR))
            torch.save(
                {
                    "loss": loss.state_dict(),
                    "ae_optimizer": ae_optimizer.state_dict(),
                    "d_optimizer": d_optimizer.state_dict(),
                    "step": step,
                },
                os.path.join(directory, STATE_FILE),
            )
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({k: float(v) for k, v in metrics.items()}, checkpoint=checkpoint)


def _validation_batches(config: dict[str, Any]) -> list[torch.Tensor]:
    """The held-out images (center crops), kept in memory: a fixed, small set."""
    images = []
    for batch in ray.train.get_dataset_shard("validation").iter_batches(batch_size=config["batch_size"], batch_format="numpy"):
        images.append(torch.from_numpy(batch["pixels"]))
    return images


def _evaluate(autoencoder, validation: list[torch.Tensor], tracker: RunLogger, step: int) -> dict[str, float]:
    if not validation:
        return {}
    device = next(autoencoder.parameters()).device
    metrics = evaluate_reconstruction(autoencoder, [b.to(device) for b in validation])
    with torch.no_grad():
        originals = validation[0][:8].to(device)
        reconstructions, _ = Reconstruct(autoencoder)(originals, sample=False)
    tracker.image(pair_grid(originals, reconstructions), f"reconstructions/step_{step:07d}.png")
    return metrics.as_dict("val/")
