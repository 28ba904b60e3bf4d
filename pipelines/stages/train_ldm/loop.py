"""The training loop of stage=train_ldm, run by every Ray Train worker: read it top to bottom.

The task (``ldm.tasks``) says what conditions the UNet: captions through a text τθ, classes through a class
embedding, layouts through a box transformer, or nothing (no tokenizer, τθ or dropout); and what is
concatenated to z_t (super-resolution's low-resolution image, inpainting's mask and masked latent, both read
from the latent rows). UNet and τθ sit in one DDP-wrapped module whose forward is the denoising loss, so the
gradients of both are averaged. Each optimizer step: draw z0 from
the stored moments, drop conditions to the null one for guidance, accumulate micro-batches, clip, AdamW at the
warm-up + schedule rate, update the EMA. Rank 0 checkpoints (UNet, τθ and
their EMA as safetensors; optimizer, step, every rank's RNG, the EMA counter, and the position in the epoch's
order that every rank has trained up to), samples the validation prompts and logs to the MLflow run the driver
opened. A restart continues the epoch on exactly the rows not yet trained on.
"""

from __future__ import annotations

import os
import tempfile
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

from ldm.data.epochs import END_OF_EPOCH, EpochStream, Interval
from ldm.data.layouts import grid_layouts
from ldm.devices import autocast as autocast_for
from ldm.devices import autocast_dtype, enable_tf32, restore_optimizer, rng_state
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
from pipelines.train_worker import (
    EpochData,
    RunLogger,
    RunTarget,
    gather_for_checkpoint,
    parameter_spread,
    private_copy,
    random_streams,
    worker_data_context,
)

STATE_FILE = "training_state.pt"


STRINGS = (
    "key",
    "label",
    "boxes",
)  # columns that stay lists of strings: keys (for the data audit), classes, layouts (JSON)


class LatentBatch(NumpyBatchCollateFn):
    """Latent shard rows to tensors; keys, class names and layouts stay strings. Ray Data hands the fixed-size token
    lists over as an object array of rows."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: torch.from_numpy(np.stack(v) if v.dtype == object else np.ascontiguousarray(v))
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
    settings, opt = config.settings, config.settings.optimizer
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(settings.seed)  # the same initial weights on every rank

    # -- tokenizer, models, optimizer, EMA, and the state to resume from ----------------------------------------
    captioned = config.task.condition == "caption"
    tokenizer = load_tokenizer(config.tokenizer, config.storage) if captioned else None
    embedded = config.empty_text_embedding is not None
    caption_column = (TEXT_EMBEDDING if embedded else "input_ids") if captioned else None

    # This run's latest checkpoint (a restart, or the same command again); else the one stage.resume names.
    checkpoint = ray.train.get_checkpoint() or config.resume_from
    state: dict[str, Any] = {}
    if checkpoint is not None:
        with private_copy(checkpoint) as directory:
            unet, text_encoder = load_models(directory)
            ema_weights = [
                p.detach().clone()
                for m in load_models(os.path.join(directory, EMA))
                if m is not None
                for p in m.parameters()
            ]
            state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    else:
        unet, text_encoder = _build_models(config, len(tokenizer) if tokenizer else 0)
    # The null condition that guidance dropout swaps in: the empty caption (its tokens or τθ), the null class or layout.
    if embedded:
        empty = torch.from_numpy(config.empty_text_embedding).to(device)
    elif captioned:
        empty = torch.from_numpy(tokenize(tokenizer, [""], config.max_length)[0][0]).long().to(device)
    elif text_encoder is not None:
        empty = text_encoder.null_tokens(1)[0].to(device)

    def conditions(batch: dict[str, Any], strict: bool = True) -> torch.Tensor | None:
        """What the batch's rows are conditioned on, as τθ takes it: tokens or τθ(y), class or layout tokens, or
        nothing. Not ``strict`` (held-out rows): a class no training row named is the null condition."""
        if captioned:
            return batch[caption_column].to(device)
        return (
            text_encoder.tokens(batch[config.task.condition], strict).to(device) if text_encoder is not None else None
        )

    def concat_input(batch: dict[str, Any]) -> torch.Tensor | None:
        """What the task concatenates to z_t: the low-resolution image in [-1, 1], or the mask and the masked
        image's latent scaled as z is; None for the others."""
        if config.task.concat == "low_res":
            return image_tensor(batch[LOW_RES]).to(device)
        if config.task.concat == "masked":
            return inpainting_input(
                batch[MASK][:, None].to(device), batch[MASKED_LATENT].to(device).float(), config.scale_factor
            )
        return None

    train_text_encoder = config.pretrained_text_encoder is None
    towers = [m for m in (unet, text_encoder) if m is not None]  # no τθ here when the latents carry its output
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
    # from_pretrained (a checkpoint) returns eval mode: a resumed τθ would lose its dropout. A frozen one stays in eval.
    module.train()
    if text_encoder is not None:
        text_encoder.train(train_text_encoder)
    trained = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)
    averaged = [p for m in towers for p in m.parameters()]  # the EMA's order; frozen ones are copied
    ema = EMAModel(averaged, decay=settings.ema.decay, update_after_step=settings.ema.start_step, foreach=True)
    # Noise, timesteps and caption dropout draw from the generator, τθ's dropout from torch's own streams: both
    # are each rank's own, and a checkpoint continues them.
    generator = torch.Generator(device=device)
    step, epoch = 0, 0
    taken: list[Interval] = []  # positions of the current epoch's order trained on before this attempt started
    if state:
        restore_optimizer(optimizer, state["optimizer"], device)
        ema.shadow_params = [p.to(device) for p in ema_weights]
        ema.optimization_step = state["ema_updates"]
        step, epoch = state["step"], state["epoch"]
        taken = config.data.resumed(state, "train_ldm", rank)
    random_streams(state, "train_ldm", rank, world, device, generator, settings.seed * 1000)
    network = ray.train.torch.prepare_model(module)
    if settings.compile:
        network = torch.compile(network)
    enable_tf32(device)
    precision = autocast_dtype(device, str(settings.precision), "stage.precision")
    autocast = autocast_for(device, precision)
    accumulation, batch_size = opt.accumulation, settings.batch_size
    global_batch = batch_size * world * accumulation

    tracker = RunLogger(config.run)
    validation = Validation(config, tokenizer, unet, text_encoder, device) if rank == 0 else None
    held_out = (
        HeldOutLoss(config, module, device, autocast, conditions, concat_input)
        if rank == 0 and config.held_out
        else None
    )
    nodes = _node_count(world)
    if rank == 0:
        counts = {
            "unet": sum(p.numel() for p in unet.parameters()),
            "text_encoder": sum(p.numel() for p in text_encoder.parameters()) if text_encoder is not None else 0,
        }
        if state:
            tracker.metrics({"resumed_from_step": step}, step)  # a restart after a failure shows in the run
        tracker.params(
            {
                "global_batch_size": global_batch,
                "world_size": world,
                "nodes": nodes,
                **{f"parameters.{k}": v for k, v in counts.items()},
            }
        )
        print(
            f"train_ldm: {world} workers on {nodes} node(s), global batch {global_batch} = {batch_size} x {world} workers x "
            f"{accumulation} accumulation; parameters {counts}"
        )

    peak = peak_flops(device, precision)
    step_flops = None  # one worker's optimizer step, counted once, on this attempt's first whole step
    loss_sum = norm_sum = data_wait = 0.0
    window_steps, window_start = 0, time.perf_counter()

    def step_loss(net: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """One micro-batch's loss: captions dropped for guidance, z0 drawn from the stored moments, then noised."""
        moments = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k.startswith("latent")}
        condition = conditions(batch)
        captions = (
            drop_captions(condition, empty, settings.caption_dropout, generator) if condition is not None else None
        )
        with autocast:
            return net(
                sample_latents(moments, config.scale_factor, generator), captions, generator, concat_input(batch)
            )

    # -- the loop: each epoch is one pass over this worker's run of the epoch's order ---------------------------
    # Each epoch is a new Ray Data read; the next one starts while this one's last batches train.
    resumed_epoch = epoch
    epoch_batches = lambda e: config.data.rows(e, rank, world, taken if e == resumed_epoch else ()).iter_torch_batches(  # noqa: E731
        batch_size=batch_size,
        collate_fn=LatentBatch(),
        drop_last=True,
        prefetch_batches=settings.prefetch_batches,
    )
    batches = EpochStream(epoch_batches, first=epoch, depth=settings.prefetch_batches)
    audit = Audit(tracker, rank, step) if settings.data_audit else None
    try:
        while step < settings.steps:
            consumed = 0  # rows of this epoch's run trained on in this attempt
            exhausted = False
            while step < settings.steps:
                set_learning_rate(
                    optimizer,
                    learning_rate(
                        step,
                        opt.lr,
                        total_steps=settings.steps,
                        schedule=opt.schedule,
                        warmup_steps=opt.warmup_steps,
                        final_ratio=opt.final_ratio,
                    ),
                )
                fetch, micro_batches = time.perf_counter(), []
                while len(micro_batches) < accumulation and not exhausted:
                    batch = batches.next()
                    exhausted = batch is END_OF_EPOCH
                    micro_batches += [] if exhausted else [batch]
                data_wait += time.perf_counter() - fetch
                if exhausted:  # a partial accumulation is dropped: every update sees the whole global batch
                    break
                if step_flops is None:  # on the bare module, with a copy of the generator: training does not see it
                    counting, counted = (
                        time.perf_counter(),
                        torch.Generator(device=device).set_state(generator.get_state()),
                    )
                    step_flops = count_step_flops(
                        lambda: [step_loss(module, batch, counted).backward() for batch in micro_batches], [module]
                    )
                    window_start += time.perf_counter() - counting  # not in steps/s
                optimizer.zero_grad(set_to_none=True)
                loss_value, keys = 0.0, []
                for micro, batch in enumerate(micro_batches):
                    keys.extend(batch["key"])
                    with nullcontext() if micro == accumulation - 1 or world == 1 else network.no_sync():
                        loss = step_loss(network, batch, generator)
                        (loss / accumulation).backward()
                    loss_value += loss.item() / accumulation
                grad_norm = torch.nn.utils.clip_grad_norm_(trained, opt.grad_clip or float("inf"))
                optimizer.step()
                ema.step(averaged)
                step += 1
                consumed += len(keys)
                if audit:
                    audit.trained(keys)
                window_steps += 1
                loss_sum += loss_value
                norm_sum += float(grad_norm)

                final = step == settings.steps
                log, save = step % settings.log_every == 0 or final, step % settings.checkpoint_every == 0 or final
                metrics: dict[str, float] = {"step": step}
                if log:
                    elapsed = time.perf_counter() - window_start
                    metrics.update(
                        {
                            "train/loss": loss_sum / window_steps,
                            "train/grad_norm": norm_sum / window_steps,
                            "train/lr": optimizer.param_groups[0]["lr"],
                            "train/samples_per_s": window_steps * global_batch / elapsed,
                            "train/steps_per_s": window_steps / elapsed,
                            "train/data_wait_fraction": data_wait / elapsed,
                            **performance(step_flops, window_steps / elapsed, peak),
                            "train/epoch": epoch,
                        }
                    )
                    if final:
                        metrics["ddp/parameter_spread"] = parameter_spread(trained, world)
                    loss_sum = norm_sum = data_wait = 0.0
                    window_steps, window_start = 0, time.perf_counter()
                if rank == 0:
                    if validation.seeds and (step % settings.sample_every == 0 or final):
                        tracker.image(validation.grid(), "samples", step)
                    if held_out and (step % settings.eval_every == 0 or final):
                        metrics["val/loss"] = held_out.loss()
                    if len(metrics) > 1:
                        tracker.metrics(metrics, step)
                if log or save:  # every rank reports at the same steps: Ray Train gathers the reports
                    if save and audit:  # before the checkpoint: a segment past the one resumed from is retrained
                        audit.log(epoch, step)
                    position = {"epoch": epoch, "taken": taken, "consumed": consumed}
                    _report(metrics, save, module, ema, optimizer, step, position, generator, world, rank, config.data)
            if exhausted:
                if audit:
                    audit.log(epoch, step)
                config.data.check_share(consumed, taken, rank, batch_size)
                epoch, taken = epoch + 1, []
    finally:
        batches.close()


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
                f"stage.model.pretrained_text_encoder={config.pretrained_text_encoder} knows {text_encoder.config.vocab_size} "
                f"tokens, the prepared captions' tokenizer ({config.tokenizer}) {vocab_size}: prepare with that encoder's "
                "tokenizer (stage=prepare stage.tokenizer.train=false stage.tokenizer.name_or_path=...)"
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


def _report(
    metrics,
    save: bool,
    module: DenoisingLoss,
    ema: EMAModel,
    optimizer,
    step: int,
    position: dict[str, Any],
    generator,
    world: int,
    rank: int,
    data: EpochData,
) -> None:
    """Every worker reports (Ray Train needs them all); rank 0 attaches the checkpoint when one is due. The
    checkpoint's data position: the epoch, and the positions of its order that every rank has trained on."""
    gathered = gather_for_checkpoint((rng_state(generator.device, generator), position["consumed"]), save, world)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if save and rank == 0:
            save_models(directory, module.unet, module.text_encoder)
            averaged = [p for m in (module.unet, module.text_encoder) if m is not None for p in m.parameters()]
            ema.store(averaged)
            ema.copy_to(averaged)
            save_models(os.path.join(directory, EMA), module.unet, module.text_encoder)
            ema.restore(averaged)
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "epoch": position["epoch"],
                    "ema_updates": ema.optimization_step,
                    "rng": [r for r, _ in gathered],
                    "data": data.position(position["epoch"], world, position["taken"], [c for _, c in gathered]),
                },
                os.path.join(directory, STATE_FILE),
            )
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({k: float(v) for k, v in metrics.items()}, checkpoint=checkpoint)


class HeldOutLoss:
    """The denoising loss on at most ``stage.validation_images`` held-out latents (rank 0 only), read once: the
    same rows, timesteps and noise at every evaluation, so its curve shows the model, not the draw."""

    def __init__(
        self, config: LoopConfig, module: DenoisingLoss, device: torch.device, autocast, conditions, concat_input
    ):
        settings = config.settings
        storage = config.data.storage
        filesystem, _ = storage.pyarrow(config.held_out[0])
        worker_data_context()
        rows = ray.data.read_parquet(
            [storage.pyarrow(f)[1] for f in config.held_out], filesystem=filesystem, columns=config.data.columns
        ).limit(settings.validation_images)
        self.batches = list(rows.iter_torch_batches(batch_size=settings.batch_size, collate_fn=LatentBatch()))
        self.module, self.device, self.autocast = module, device, autocast
        self.scale_factor, self.seed = config.scale_factor, settings.validation.seed
        self.conditions, self.concat_input = conditions, concat_input

    @torch.no_grad()
    def loss(self) -> float:
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        modes = [
            (m, m.training) for m in (self.module.unet, self.module.text_encoder) if m is not None
        ]  # a frozen τθ stays in eval
        self.module.eval()
        total, count = 0.0, 0
        for batch in self.batches:
            moments = {k: v.to(self.device) for k, v in batch.items() if k.startswith("latent")}
            with self.autocast:
                loss = self.module(
                    sample_latents(moments, self.scale_factor, generator),
                    self.conditions(batch, strict=False),
                    generator,
                    self.concat_input(batch),
                )
            total += float(loss) * len(batch["key"])
            count += len(batch["key"])
        for part, mode in modes:
            part.train(mode)
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
        modes = [(m, m.training) for m in self.parts]  # a frozen τθ stays in eval
        for part in self.parts:
            part.eval()
        images = generate_images(
            self.pipeline,
            self.prompts,
            self.seeds,
            steps=self.settings.steps,
            guidance_scale=self.settings.guidance_scale,
        )
        for part, mode in modes:
            part.train(mode)
        return captioned_grid(images, self.labels or condition_captions(self.pipeline, self.prompts, self.seeds))
