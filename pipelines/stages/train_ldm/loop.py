"""The training loop of stage=train_ldm, run by every Ray Train worker: read it top to bottom.

The task (``ldm.tasks``) says what conditions the UNet: captions through a text τθ, classes through a class
embedding, layouts through a box transformer, or nothing (no tokenizer, τθ or dropout); and what is
concatenated to z_t (super-resolution's low-resolution image, inpainting's mask and masked latent, both read
from the latent rows). UNet and τθ sit in one DDP-wrapped module whose forward is the denoising loss, so the
gradients of both are averaged. Each optimizer step: draw z0 from the stored moments, drop conditions to the null
one for guidance, accumulate micro-batches, clip, AdamW at the warm-up + schedule rate, update the EMA. Rank 0
checkpoints (``pipelines.worker.checkpoint``: UNet, τθ and their EMA as safetensors, the optimizer and the EMA's
counters), samples the validation prompts and logs to the MLflow run the driver opened. A restart continues the
epoch on exactly the rows not yet trained on.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from diffusers.training_utils import EMAModel
from ray.data.collate_fn import NumpyBatchCollateFn

from ldm.data.epochs import END_OF_EPOCH, EpochStream
from ldm.data.layouts import grid_layouts
from ldm.devices import autocast as autocast_for
from ldm.devices import autocast_dtype, enable_tf32, restore_optimizer
from ldm.diffusion.objective import DenoisingLoss, DiffusionObjective, drop_captions, noise_scheduler, sample_latents
from ldm.diffusion.sampling import condition_captions, generate_images, sampler, task_pipeline
from ldm.flops import peak_flops, performance
from ldm.flops import step_flops as count_step_flops
from ldm.grids import captioned_grid
from ldm.latents import LOW_RES, MASK, MASKED_LATENT, TEXT_EMBEDDING
from ldm.lr_schedule import learning_rate, set_learning_rate
from ldm.models.conditioners import ClassEmbedder, LayoutEncoder
from ldm.models.first_stage import load_first_stage
from ldm.models.image_conditioned import image_conditions, image_tensor, inpainting_input
from ldm.models.presets import text_to_image_preset
from ldm.models.text_to_image import (
    EMA,
    build_text_encoder,
    build_unet,
    context_width,
    load_models,
    load_text_encoder,
    save_models,
    set_attention,
    set_trainable,
)
from ldm.storage import Storage
from ldm.tasks import Task
from ldm.text.tokenizer import load_tokenizer, tokenize
from pipelines.schema import Noise, TrainLdm
from pipelines.worker.checkpoint import Checkpointer
from pipelines.worker.console import ProgressLine, quiet_worker
from pipelines.worker.data import EpochData, held_out_rows
from pipelines.worker.run_logger import RunLogger, RunTarget
from pipelines.worker.training import Window, due, evaluation_mode, parameter_spread

STAGE = "train_ldm"
# Columns that stay lists of strings: keys (for the data audit), classes, layouts (JSON).
STRINGS = ("key", "label", "boxes")


class LatentBatch(NumpyBatchCollateFn):
    """Latent shard rows to tensors; keys, class names and layouts stay strings. Ray Data hands the fixed-size token
    lists over as an object array of rows, and the other columns as read-only views of Arrow's buffers, which are
    copied (a batch of latents is small) rather than shared with a tensor that could write to them."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: torch.from_numpy(np.stack(v) if v.dtype == object else np.array(v))
            for k, v in batch.items()
            if k not in STRINGS
        }
        if "input_ids" in out:  # absent when the rows carry τθ(y) instead
            out["input_ids"] = out["input_ids"].long()
        out.update({k: [None if v is None else str(v) for v in batch[k]] for k in STRINGS if k in batch})
        return out


@dataclass(frozen=True)
class LoopConfig:
    """What every worker gets: the stage's typed config and what the driver resolved for it."""

    settings: TrainLdm
    task: Task
    data: EpochData  # the latents, and each epoch's order of them
    held_out: list[str]  # latents of prepare's held-out rows (encode_latents' held_out/): never trained on
    tokenizer: str | None  # the prepared captions' tokenizer (None: the task has no captions)
    max_length: int | None
    classes: list[str] | None  # the class vocabulary (encode_latents' manifest) of a class or layout task
    layout: dict[str, int] | None  # a layout task's τθ bounds (task.max_objects, task.grid)
    # Keys and crops (N x H x W x 3 uint8) of the first validation.images held-out rows: the validation grid's
    # inputs for a task that concatenates an image to z_t (None for the others).
    validation_images: tuple[list[str], np.ndarray] | None
    latent_shape: list[int]  # c, h, w
    scale_factor: float
    first_stage: dict[str, Any]  # the latents' first stage (location, subfolder): validation grids decode with it
    pretrained_text_encoder: str | None  # as every process spells it (or None: τθ trained from the preset)
    pretrained_text_encoder_subfolder: str | None
    # The latents carry that encoder's τθ(y) (encode_latents' stage.text_encoder): it is then never run here,
    # and caption dropout swaps in the empty caption's embedding. None: the tokens go through τθ each step.
    empty_text_embedding: np.ndarray | None
    resume_from: ray.train.Checkpoint | None  # stage.resume's checkpoint, when it names one
    storage: Storage
    run: RunTarget


def train_loop(config: LoopConfig) -> None:
    """What every Ray Train worker runs: build (or resume), then train to ``stage.steps``."""
    Trainer(config).train()


@dataclass
class Parts:
    """What trains: the UNet and τθ in one DDP-wrapped loss module, their optimizer and EMA; what a checkpoint
    holds of them (``Checkpointed``): the weights and the EMA's as diffusers folders, the optimizer's state and
    the EMA's counters."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module | None
    module: DenoisingLoss
    optimizer: torch.optim.AdamW
    ema: EMAModel
    trained: list[torch.nn.Parameter]  # what the optimizer steps (a frozen τθ's are not)
    averaged: list[torch.nn.Parameter]  # what the EMA averages, in its order (a frozen τθ's are copied)

    def save_models(self, directory: str) -> None:
        save_models(directory, self.unet, self.text_encoder)
        self.ema.store(self.averaged)
        self.ema.copy_to(self.averaged)
        save_models(os.path.join(directory, EMA), self.unet, self.text_encoder)
        self.ema.restore(self.averaged)

    def state_dict(self) -> dict[str, Any]:
        ema = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}  # saved as weights above
        return {"optimizer": self.optimizer.state_dict(), "ema": ema}

    def load_state_dict(self, state: dict[str, Any], ema_weights: list[torch.Tensor], device: torch.device) -> None:
        restore_optimizer(self.optimizer, state["optimizer"], device)
        # Checkpoints written before the EMA's state_dict was kept held its update count alone.
        ema = state.get("ema") or {"optimization_step": state["ema_updates"]}
        self.ema.load_state_dict({**ema, "shadow_params": [p.to(device) for p in ema_weights]})


class Conditioning:
    """What the batch's rows condition the UNet on, as the task says: tokens or τθ(y) of captions, class or
    layout tokens, or nothing; the null condition that guidance dropout swaps in (the empty caption's tokens or
    τθ(y), the null class or layout); and what is concatenated to z_t (super-resolution's low-resolution image,
    inpainting's mask and masked latent, both read from the latent rows)."""

    def __init__(self, config: LoopConfig, tokenizer, text_encoder: torch.nn.Module | None, device: torch.device):
        self.task, self.text_encoder, self.device, self.scale_factor = (
            config.task,
            text_encoder,
            device,
            config.scale_factor,
        )
        captioned, embedded = config.task.condition == "caption", config.empty_text_embedding is not None
        self.caption_column = (TEXT_EMBEDDING if embedded else "input_ids") if captioned else None
        self.empty = None
        if embedded:
            self.empty = torch.tensor(config.empty_text_embedding, device=device)
        elif captioned:
            self.empty = torch.from_numpy(tokenize(tokenizer, [""], config.max_length)[0][0]).long().to(device)
        elif text_encoder is not None:
            self.empty = text_encoder.null_tokens(1)[0].to(device)

    def of(self, batch: dict[str, Any], strict: bool = True) -> torch.Tensor | None:
        """Not ``strict`` (held-out rows): a class no training row named is the null condition."""
        if self.caption_column is not None:
            return batch[self.caption_column].to(self.device)
        if self.text_encoder is None:
            return None
        return self.text_encoder.tokens(batch[self.task.condition], strict).to(self.device)

    def concat(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The low-resolution image in [-1, 1], or the mask and the masked image's latent scaled as z is."""
        if self.task.concat == "low_res":
            return image_tensor(batch[LOW_RES]).to(self.device)
        if self.task.concat == "masked":
            mask, masked = batch[MASK][:, None].to(self.device), batch[MASKED_LATENT].to(self.device).float()
            return inpainting_input(mask, masked, self.scale_factor)
        return None


class Trainer:
    """One worker's training: ``train()`` reads top to bottom; each step it calls is a method below."""

    def __init__(self, config: LoopConfig):
        quiet_worker()
        self.config, self.settings = config, config.settings
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(self.settings.seed)  # the same initial weights on every rank
        self.build_parts()
        self.build_precision()
        self.global_batch = self.settings.batch_size * self.world * self.settings.optimizer.accumulation
        self.tracker = RunLogger(config.run)
        self.announce(_node_count(self.world))
        self.validation = self.held_out = None
        if self.rank == 0:
            self.validation = Validation(config, self.tokenizer, self.parts.unet, self.parts.text_encoder, self.device)
            if config.held_out:
                self.held_out = HeldOutLoss(config, self.parts.module, self.device, self.autocast, self.conditioning)
        self.audit = Audit(self.tracker, self.rank, self.position.step) if self.settings.data_audit else None
        self.window, self.step_flops = Window(), None  # one worker's optimizer step, counted on the first one
        self.progress = ProgressLine(STAGE, self.settings.steps, self.position.step, enabled=self.rank == 0)
        # Each epoch is a new Ray Data read; the next one starts while this one's last batches train.
        self.resumed = (self.position.epoch, self.position.taken)
        self.batches = EpochStream(self.epoch_rows, first=self.position.epoch, depth=self.settings.prefetch_batches)

    def build_parts(self) -> None:
        """The tokenizer, the models (this run's latest checkpoint, the one ``stage.resume`` names, or new ones),
        their optimizer and EMA, the position to go on from and this rank's random streams."""
        config, settings = self.config, self.settings
        self.tokenizer = (
            load_tokenizer(config.tokenizer, config.storage) if config.task.condition == "caption" else None
        )
        # Noise, timesteps and caption dropout draw from the generator, τθ's dropout from torch's own streams:
        # both are each rank's own, and a checkpoint continues them.
        self.generator = torch.Generator(device=self.device)
        self.checkpointer = Checkpointer(STAGE, config.data, self.device, self.generator)
        with self.checkpointer.latest(config.resume_from) as saved:
            if saved is not None:
                unet, text_encoder = load_models(saved.directory)
                ema_models = load_models(os.path.join(saved.directory, EMA))
                ema_weights = [p.detach().clone() for m in ema_models if m is not None for p in m.parameters()]
            else:
                unet, text_encoder = _build_models(config, len(self.tokenizer) if self.tokenizer else 0)
        self.conditioning = Conditioning(config, self.tokenizer, text_encoder, self.device)
        self.parts = training_parts(settings, unet, text_encoder, config.pretrained_text_encoder is None, self.device)
        if saved is not None:
            self.parts.load_state_dict(saved.state, ema_weights, self.device)
        self.position = self.checkpointer.resume(saved, settings.seed * 1000)
        self.network = ray.train.torch.prepare_model(self.parts.module)
        if settings.compile:
            self.network = torch.compile(self.network)

    def build_precision(self) -> None:
        enable_tf32(self.device)
        precision = autocast_dtype(self.device, str(self.settings.precision), "stage.precision")
        self.autocast, self.peak = autocast_for(self.device, precision), peak_flops(self.device, precision)

    def announce(self, nodes: int) -> None:
        """Rank 0: the run's shape in MLflow's params and on the console; a restart shows in the run."""
        if self.rank != 0:
            return
        parts, settings = self.parts, self.settings
        counts = {
            "unet": sum(p.numel() for p in parts.unet.parameters()),
            "text_encoder": sum(p.numel() for p in parts.text_encoder.parameters()) if parts.text_encoder else 0,
        }
        if self.position.step:
            self.tracker.metrics({"resumed_from_step": self.position.step}, self.position.step)
        self.tracker.params(
            {
                "global_batch_size": self.global_batch,
                "world_size": self.world,
                "nodes": nodes,
                **{f"parameters.{k}": v for k, v in counts.items()},
            }
        )
        print(
            f"{STAGE}: {self.world} workers on {nodes} node(s), global batch {self.global_batch} = "
            f"{settings.batch_size} x {self.world} workers x {settings.optimizer.accumulation} accumulation; "
            f"parameters {counts}"
        )

    def train(self) -> None:
        """Each epoch is one pass over this worker's run of the epoch's order; a partial accumulation at its end
        is dropped, so that every update sees the whole global batch."""
        try:
            while self.position.step < self.settings.steps:
                micro_batches = self.next_micro_batches()
                if micro_batches is None:
                    self.end_epoch()
                    continue
                self.count_flops(micro_batches)
                loss = self.train_step(micro_batches)
                self.progress.update(self.position.step, loss)
                self.log_validate_checkpoint()
        finally:
            self.batches.close()

    def epoch_rows(self, epoch: int):
        """This rank's batches of ``epoch``, less what was trained on before a restart."""
        resumed_epoch, taken = self.resumed
        rows = self.config.data.rows(epoch, self.rank, self.world, taken if epoch == resumed_epoch else ())
        return rows.iter_torch_batches(
            batch_size=self.settings.batch_size,
            collate_fn=LatentBatch(),
            drop_last=True,
            prefetch_batches=self.settings.prefetch_batches,
        )

    def next_micro_batches(self) -> list[dict[str, Any]] | None:
        """An optimizer step's micro-batches; None at the end of the epoch's run."""
        fetch, micro_batches = time.perf_counter(), []
        while len(micro_batches) < self.settings.optimizer.accumulation:
            batch = self.batches.next()
            if batch is END_OF_EPOCH:
                micro_batches = None
                break
            micro_batches.append(batch)
        self.window.data_wait += time.perf_counter() - fetch
        return micro_batches

    def micro_batch_loss(self, network: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator):
        """One micro-batch's loss: conditions dropped for guidance, z0 drawn from the stored moments, then noised."""
        moments = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k.startswith("latent")}
        condition = self.conditioning.of(batch)
        if condition is not None:
            condition = drop_captions(condition, self.conditioning.empty, self.settings.caption_dropout, generator)
        with self.autocast:
            z0 = sample_latents(moments, self.config.scale_factor, generator)
            return network(z0, condition, generator, self.conditioning.concat(batch))

    def count_flops(self, micro_batches: list[dict[str, Any]]) -> None:
        """One worker's step, counted once on the bare module with a copy of the generator: training sees none of it."""
        if self.step_flops is not None:
            return
        counting = time.perf_counter()
        generator = torch.Generator(device=self.device).set_state(self.generator.get_state())

        def forwards_and_backwards() -> None:
            for batch in micro_batches:
                self.micro_batch_loss(self.parts.module, batch, generator).backward()

        self.step_flops = count_step_flops(forwards_and_backwards, [self.parts.module])
        self.window.exclude(time.perf_counter() - counting)  # not in the rates

    def train_step(self, micro_batches: list[dict[str, Any]]) -> float:
        """Accumulate the micro-batches' gradients (DDP averages them on the last), clip, AdamW at the warm-up +
        schedule rate, update the EMA; the step's loss."""
        parts, opt, accumulation = self.parts, self.settings.optimizer, self.settings.optimizer.accumulation
        rate = learning_rate(
            self.position.step,
            opt.lr,
            total_steps=self.settings.steps,
            schedule=opt.schedule,
            warmup_steps=opt.warmup_steps,
            final_ratio=opt.final_ratio,
        )
        set_learning_rate(parts.optimizer, rate)
        parts.optimizer.zero_grad(set_to_none=True)
        loss_value, keys = 0.0, []
        for micro, batch in enumerate(micro_batches):
            keys.extend(batch["key"])
            with nullcontext() if micro == accumulation - 1 or self.world == 1 else self.network.no_sync():
                loss = self.micro_batch_loss(self.network, batch, self.generator)
                (loss / accumulation).backward()
            loss_value += loss.item() / accumulation
        grad_norm = torch.nn.utils.clip_grad_norm_(parts.trained, opt.grad_clip or float("inf"))
        parts.optimizer.step()
        parts.ema.step(parts.averaged)
        self.position.step += 1
        self.position.consumed += len(keys)
        if self.audit:
            self.audit.trained(keys)
        self.window.add(self.global_batch, {"loss": loss_value, "grad_norm": float(grad_norm)})
        return loss_value

    def log_validate_checkpoint(self) -> None:
        """What is due at this step: the window's metrics, the validation grid and held-out loss (rank 0), a
        checkpoint (with the data audit's segment before it: a segment past the one resumed from is retrained)."""
        settings, step = self.settings, self.position.step
        log, save = due(step, settings.log_every, settings.steps), due(step, settings.checkpoint_every, settings.steps)
        metrics: dict[str, float] = {"step": step}
        if log:
            metrics.update(self.window_metrics())
            self.window.restart()
        if self.rank == 0:
            if self.validation.seeds and due(step, settings.sample_every, settings.steps):
                self.tracker.image(self.validation.grid(), "samples", step)
            if self.held_out and due(step, settings.eval_every, settings.steps):
                metrics["val/loss"] = self.held_out.loss()
            if len(metrics) > 1:
                self.tracker.metrics(metrics, step)
        if log or save:  # every rank reports at the same steps: Ray Train gathers the reports
            if save and self.audit:
                self.audit.log(self.position.epoch, step)
            self.checkpointer.report(metrics, self.position, save, self.parts)

    def window_metrics(self) -> dict[str, float]:
        metrics = self.window.metrics()
        metrics.update(performance(self.step_flops, metrics["train/steps_per_s"], self.peak))
        metrics.update({"train/lr": self.parts.optimizer.param_groups[0]["lr"], "train/epoch": self.position.epoch})
        if self.position.step == self.settings.steps:
            metrics["ddp/parameter_spread"] = parameter_spread(self.parts.trained, self.world)
        return metrics

    def end_epoch(self) -> None:
        if self.audit:
            self.audit.log(self.position.epoch, self.position.step)
        self.config.data.check_share(self.position.consumed, self.position.taken, self.rank, self.settings.batch_size)
        self.position.next_epoch()


def training_parts(
    settings: TrainLdm,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    train_text_encoder: bool,
    device: torch.device,
) -> Parts:
    """The loss module on ``device`` in training mode (a frozen τθ stays in eval), its optimizer and EMA."""
    if text_encoder is not None:
        set_trainable(text_encoder, train_text_encoder)
    set_attention(unet, settings.attention, device)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if (
            text_encoder is not None
            and train_text_encoder
            and getattr(text_encoder, "supports_gradient_checkpointing", False)
        ):
            text_encoder.gradient_checkpointing_enable()
    objective = DiffusionObjective(training_schedule(settings.noise), settings.noise.snr_gamma)
    module = DenoisingLoss(unet, text_encoder, objective, train_text_encoder).to(device)
    # from_pretrained (a checkpoint) returns eval mode: a resumed τθ would lose its dropout.
    module.train()
    if text_encoder is not None:
        text_encoder.train(train_text_encoder)
    opt = settings.optimizer
    trained = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)
    averaged = [p for m in (unet, text_encoder) if m is not None for p in m.parameters()]
    ema = EMAModel(averaged, decay=settings.ema.decay, update_after_step=settings.ema.start_step, foreach=True)
    return Parts(unet, text_encoder, module, optimizer, ema, trained, averaged)


class Audit:
    """The keys this rank trained on (``stage.data_audit``), logged as one MLflow text file per epoch and
    checkpoint: ``data_audit/epoch-EEEE/rank-R-steps-AAAAAA-BBBBBB.txt`` holds those of steps A+1..B. After a
    restart from step S, a segment of the failed attempt that ends past S was trained on again."""

    def __init__(self, tracker: RunLogger, rank: int, step: int):
        self.tracker, self.rank, self.since, self.keys = tracker, rank, step, []

    def trained(self, keys: list[str]) -> None:
        self.keys.extend(keys)

    def log(self, epoch: int, step: int) -> None:
        if self.keys:
            self.tracker.text(
                "\n".join(self.keys),
                f"data_audit/epoch-{epoch:04d}/rank-{self.rank}-steps-{self.since:06d}-{step:06d}.txt",
            )
        self.since, self.keys = step, []


def training_schedule(noise: Noise):
    """The noise schedule ``stage.noise`` describes, as the diffusers scheduler config the samplers read."""
    return noise_scheduler(
        str(noise.schedule),
        str(noise.prediction_type),
        noise.timesteps,
        noise.beta_start,
        noise.beta_end,
        noise.zero_terminal_snr,
    )


def _build_models(config: LoopConfig, vocab_size: int) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    model = config.settings.model
    spec = text_to_image_preset(model.preset, model.unet, model.text_encoder)
    channels, size = config.latent_shape[0], config.latent_shape[1]
    if not config.task.cross_attention:
        return build_unet(spec.unet, channels, size, None, config.task.extra_channels(channels)), None
    if config.task.condition in ("label", "boxes"):  # τθ as wide (and for layouts as deep) as the preset's text encoder
        text, classes = spec.text_encoder, list(config.classes)
        embedder = (
            ClassEmbedder(num_classes=len(classes), width=text.width, classes=classes)
            if config.task.condition == "label"
            else LayoutEncoder(
                num_classes=len(classes),
                width=text.width,
                layers=text.layers,
                heads=text.heads,
                classes=classes,
                **config.layout,
            )
        )
        return build_unet(spec.unet, channels, size, text.width), embedder
    if config.empty_text_embedding is not None:
        return build_unet(spec.unet, channels, size, config.empty_text_embedding.shape[-1]), None
    if config.pretrained_text_encoder is not None:
        text_encoder = load_text_encoder(
            config.pretrained_text_encoder, config.storage, config.pretrained_text_encoder_subfolder
        )
        if vocab_size > text_encoder.config.vocab_size:
            raise ValueError(
                f"stage.model.pretrained_text_encoder={config.pretrained_text_encoder} knows "
                f"{text_encoder.config.vocab_size} tokens, the prepared captions' tokenizer ({config.tokenizer}) "
                f"{vocab_size}: prepare with that encoder's tokenizer "
                "(stage=prepare stage.tokenizer.train=false stage.tokenizer.name_or_path=...)"
            )
    else:
        text_encoder = build_text_encoder(spec.text_encoder, vocab_size, config.max_length)
    return build_unet(spec.unet, channels, size, context_width(text_encoder)), text_encoder


def _node_count(world: int) -> int:
    """How many machines the workers are on (logged: DDP across nodes is the point of a cluster)."""
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return 1
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


class HeldOutLoss:
    """The denoising loss on at most ``stage.validation_images`` held-out latents (rank 0 only), read once: the
    same rows, timesteps and noise at every evaluation, so its curve shows the model, not the draw."""

    def __init__(
        self, config: LoopConfig, module: DenoisingLoss, device: torch.device, autocast, conditioning: Conditioning
    ):
        settings = config.settings
        rows = held_out_rows(config.data.storage, config.held_out, config.data.columns, settings.validation_images)
        self.batches = list(rows.iter_torch_batches(batch_size=settings.batch_size, collate_fn=LatentBatch()))
        self.module, self.device, self.autocast = module, device, autocast
        self.scale_factor, self.seed = config.scale_factor, settings.validation.seed
        self.conditioning = conditioning

    @torch.no_grad()
    def loss(self) -> float:
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        total, count = 0.0, 0
        with evaluation_mode(self.module.unet, self.module.text_encoder):
            for batch in self.batches:
                moments = {k: v.to(self.device) for k, v in batch.items() if k.startswith("latent")}
                condition, concat = self.conditioning.of(batch, strict=False), self.conditioning.concat(batch)
                with self.autocast:
                    loss = self.module(
                        sample_latents(moments, self.scale_factor, generator), condition, generator, concat
                    )
                total += float(loss) * len(batch["key"])
                count += len(batch["key"])
        return total / max(1, count)


class Validation:
    """A grid of samples, decoded by the first stage (rank 0 only): for the fixed validation prompts, the first
    ``validation.images`` classes, that many layouts (each class in each quadrant in turn), the first that many
    held-out images' low-resolution or masked versions, or (unconditional) that many images, from the same
    seeds each time."""

    def __init__(
        self,
        config: LoopConfig,
        tokenizer,
        unet: torch.nn.Module,
        text_encoder: torch.nn.Module | None,
        device: torch.device,
    ):
        self.settings = config.settings.validation
        first = config.first_stage
        first_stage = load_first_stage(first["location"], config.storage, first["subfolder"]).to(device).eval()
        scheduler = sampler(self.settings.sampler, training_schedule(config.settings.noise).config)
        condition = config.task.condition
        self.prompts = {
            "caption": lambda: list(self.settings.prompts),
            "label": lambda: list(config.classes)[: self.settings.images],
            "boxes": lambda: grid_layouts(config.classes, self.settings.images),
        }.get(condition, lambda: None)()
        self.labels = None
        if (
            config.task.concat
        ):  # the driver's held-out images, made into the task's input as encode_latents made the rows'
            self.labels, pixels = config.validation_images
            self.prompts = image_conditions(config.task.concat, pixels, self.labels, config.latent_shape[1])
        self.seeds = [
            self.settings.seed + i for i in range(self.settings.images if self.prompts is None else len(self.prompts))
        ]
        if (
            condition == "caption" and text_encoder is None
        ):  # the latents carry τθ(y): the frozen encoder is loaded for the prompts only
            text_encoder = load_text_encoder(
                config.pretrained_text_encoder, config.storage, config.pretrained_text_encoder_subfolder
            )
            text_encoder = text_encoder.to(device).eval()
        self.pipeline = task_pipeline(
            unet, text_encoder, tokenizer, first_stage, config.scale_factor, scheduler, config.task.concat
        )
        self.parts = [m for m in (unet, text_encoder) if m is not None]

    def grid(self):
        with evaluation_mode(*self.parts):
            images = generate_images(
                self.pipeline,
                self.prompts,
                self.seeds,
                steps=self.settings.steps,
                guidance_scale=self.settings.guidance_scale,
            )
        return captioned_grid(images, self.labels or condition_captions(self.pipeline, self.prompts, self.seeds))
