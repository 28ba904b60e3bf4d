"""A frozen text encoder's τθ(y) precomputed by encode_latents against running the encoder every train_ldm step.

For two frozen encoders, random-init (speed does not depend on the weights): one of CLIP ViT-L/14's text tower's
size (12 layers, width 768, 12 heads, 77 positions: Stable Diffusion's) and one of the tiny preset's τθ shape:

1. stage=encode_latents on ``--images`` prepared images without and with ``stage.text_encoder``: the cost of
   adding the embeddings (wall-time ratio), and the bytes a row's embedding takes in the shards (zstd parquet),
   beside what storing only the non-padding tokens (and a mask) would take uncompressed.
2. The train_ldm step in this process, same UNet, batch, threads and precision: (a) on the stored embeddings,
   (b) running the frozen encoder on the tokens every step; steps/s of both and the ratio (a)/(b).

    .venv/bin/python benchmarks/text_embeddings.py [--images 512] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import CLIPTextConfig, CLIPTextModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm.devices import autocast as autocast_for  # noqa: E402
from ldm.devices import autocast_dtype
from ldm.diffusion.objective import DenoisingLoss, DiffusionObjective, sample_latents  # noqa: E402
from ldm.latents import TEXT_EMBEDDING, column_array  # noqa: E402
from ldm.models.first_stage import build_first_stage  # noqa: E402
from ldm.models.presets import first_stage_preset, text_to_image_preset  # noqa: E402
from ldm.models.text_to_image import build_text_encoder, build_unet, context_width, set_attention, set_trainable  # noqa: E402
from pipelines import stages  # noqa: E402
from pipelines.driver.config import compose as config  # noqa: E402
from pipelines.stages.train_ldm.loop import training_schedule  # noqa: E402


def encoders(vocab: int, max_length: int) -> dict[str, torch.nn.Module]:
    clip_l = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=max_length,
        bos_token_id=2,
        eos_token_id=3,
    )
    tiny = text_to_image_preset("tiny").text_encoder
    return {"clip-l-text-size": CLIPTextModel(clip_l), "tiny": build_text_encoder(tiny, vocab, max_length)}


def step_rate(cfg, shards: dict[str, np.ndarray], encoder: torch.nn.Module | None, context: int, steps: int) -> float:
    """Optimizer steps/s of the train_ldm step on in-memory rows; with ``encoder``, τθ(y) is computed each step."""
    settings = cfg.stage
    torch.manual_seed(0)
    spec = text_to_image_preset(settings.model.preset, settings.model.unet, settings.model.text_encoder)
    unet = build_unet(spec.unet, shards["latent_mean"].shape[1], shards["latent_mean"].shape[2], context)
    set_attention(unet, settings.attention, torch.device("cpu"))
    if encoder is not None:
        set_trainable(encoder, False)
        encoder.eval()
    module = DenoisingLoss(
        unet, encoder, DiffusionObjective(training_schedule(settings.noise)), train_text_encoder=False
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.optimizer.lr)
    batch = settings.batch_size * settings.scaling.num_workers
    cpu = torch.device("cpu")
    autocast = autocast_for(cpu, autocast_dtype(cpu, str(settings.precision), "stage.precision"))
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    for step in range(steps + 2):  # 2 warm-up steps
        if step == 2:
            started = time.perf_counter()
        rows = rng.integers(len(shards["input_ids"]), size=batch)
        captions = (
            torch.from_numpy(shards["input_ids"][rows]).long()
            if encoder is not None
            else torch.from_numpy(shards[TEXT_EMBEDDING][rows])
        )
        with autocast:
            moments = {k: torch.from_numpy(shards[k][rows]) for k in ("latent_mean", "latent_logvar")}
            loss = module(sample_latents(moments, 1.0, generator), captions, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps / (time.perf_counter() - started)


def stored_bytes_per_row(folder: Path, column: str) -> float:
    """The column's compressed bytes in the parquet files, per row."""
    total = rows = 0
    for path in folder.glob("*.parquet"):
        meta = pq.ParquetFile(path).metadata
        rows += meta.num_rows
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            total += sum(
                group.column(c).total_compressed_size
                for c in range(group.num_columns)
                if group.column(c).path_in_schema.split(".")[0] == column
            )
    return total / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="measured train_ldm steps per variant")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    work = Path(tempfile.mkdtemp(prefix="bench-text-embeddings-"))
    common = [
        f"storage.root={work}/store",
        f"tracking.uri=sqlite:///{work}/mlruns.db",
        "tracking.experiment=bench",
        f"data.num_samples={args.images}",
    ]
    build_first_stage(first_stage_preset("tiny-kl-f4"), logvar_bias=-6.0).save_pretrained(work / "first_stage")
    stages.load("synthesize").run(config("stage=synthesize", *common))
    prepared = stages.load("prepare").run(config("stage=prepare", *common))
    vocab, max_length = prepared["facts"]["tokenizer"]["vocab_size"], prepared["facts"]["tokenizer"]["max_length"]
    encode = ["stage=encode_latents", *common, f"stage.first_stage={work}/first_stage"]

    def timed_encode(name: str, *overrides: str) -> tuple[float, Path]:
        out = work / "store" / f"latents-{name}"
        started = time.perf_counter()
        stages.load("encode_latents").run(config(*encode, f"stage.output_url={out}", *overrides))
        return time.perf_counter() - started, out

    plain_seconds, _ = timed_encode("plain")
    cfg = config("stage=train_ldm", *common)
    rows = []
    for name, encoder in encoders(vocab, max_length).items():
        encoder.save_pretrained(work / name)
        seconds, out = timed_encode(name, f"stage.text_encoder={work / name}")
        table = pq.read_table(
            out / "shards", columns=["input_ids", "attention_mask", "latent_mean", "latent_logvar", TEXT_EMBEDDING]
        )
        shards = {
            c: np.stack(table[c].to_numpy(zero_copy_only=False))
            if c in ("input_ids", "attention_mask")
            else column_array(table[c])
            for c in table.column_names
        }
        width = context_width(encoder)
        stored = stored_bytes_per_row(out / "shards", TEXT_EMBEDDING)
        tokens = shards["attention_mask"].sum(axis=1).mean()
        precomputed = step_rate(cfg, shards, None, width, args.steps)
        every_step = step_rate(cfg, shards, encoder, width, args.steps)
        rows.append(
            (
                name,
                sum(p.numel() for p in encoder.parameters()),
                seconds / plain_seconds,
                stored,
                max_length * width * 2,
                tokens * width * 2 + max_length,
                precomputed,
                every_step,
            )
        )

    s = cfg.stage
    print(
        f"\ncores: {os.cpu_count()} | {args.images} images at {cfg.data.resolution}px, "
        f"preset {s.model.preset} UNet, global batch {s.batch_size * s.scaling.num_workers}, "
        f"precision {s.precision}; encode_latents without embeddings {plain_seconds:.1f}s"
    )
    print(
        "| encoder | parameters | encode_latents time with / without | stored bytes a row (zstd) | "
        "full sequence fp16 | non-padding + mask fp16 | steps/s precomputed (a) | "
        "steps/s encoder every step (b) | (a)/(b) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, params, cost, stored, full, trimmed, a, b in rows:
        print(
            f"| {name} | {params / 1e6:.1f}M | {cost:.2f} | {stored:,.0f} | {full:,} | {trimmed:,.0f} | "
            f"{a:.2f} | {b:.2f} | {a / b:.2f} |"
        )
    print(f"work dir: {work}")


if __name__ == "__main__":
    main()
