"""stage=encode_latents: the prepared images through the first stage's encoder, once, into latent shards.

Ray Data streams the prepared files through CPU decode tasks (read, resize, center crop), an actor pool holding the
first stage (``encoder.py``; on GPUs when ``num_gpus_per_encoder`` > 0, in half precision there), and writer
tasks (``remote.py``). The driver counts each prepared file's rows as the writers report them and marks the file
done when all are written or dropped, so a killed run resumes file by file without duplicating a key. The
manifest records the latents' statistics and ``scale_factor`` over exactly the rows written, the first stage's
identity and the tokenizer's location. For a task that concatenates an image to z_t (``task=super_resolution``,
``inpainting``), the rows carry it too: the low-resolution image, or a random mask and the masked image's latent.
"""

from __future__ import annotations

import time
from collections import defaultdict
from functools import partial
from typing import Any

import ray
import torch
from omegaconf import DictConfig
from safetensors.numpy import save
from tqdm import tqdm

from ldm.latents import CONCAT, TEXT_EMBEDDING, LatentStats, latent_columns
from ldm.manifest import clear, data_row_groups, read_manifest, verify
from ldm.markers import read_markers, write_marker
from ldm.models.first_stage import factor, kind, load_first_stage
from ldm.models.text_to_image import context_width, load_text_encoder
from ldm.storage import Storage, is_hub_id, model_location, weights_digest
from ldm.tasks import task as named_task
from ldm.text.tokenizer import load_tokenizer, tokenize
from pipelines.driver.cluster import Request
from pipelines.driver.config import plain
from pipelines.driver.stage import Inputs, Job, Output, Stage
from pipelines.stages.encode_latents import remote
from pipelines.stages.encode_latents.encoder import Encoder, encoder_device, text_embeddings

# 2: parts are written in row groups of stage.row_group_rows, listed in the manifest; the first
#    stage.held_out_images of prepare's held-out rows are encoded too, into held_out/.
# 3: the class and layout columns (label, boxes) are carried, and the classes they name listed in the manifest.
# 4: the manifest counts the training rows with a layout (rows_with_boxes); super-resolution and inpainting
#    (task=) add their UNet input's columns (low_res; mask, masked_latent).
STAGE = Stage(
    "encode_latents",
    version=4,
    output_url=lambda cfg: cfg.stage.output_url,
    resume=True,
    detail="{rows_out} rows",
    requests=lambda cfg: _requests(cfg.stage.resources),
)
WORK = "_work"
EMPTY_TEXT_EMBEDDING = "empty_text_embedding.safetensors"


def run(cfg: DictConfig) -> dict[str, Any]:
    return STAGE.run(cfg, _inputs, _encode)


def _inputs(cfg: DictConfig, storage: Storage) -> Inputs:
    """The prepared images (not metadata) and the first stage, loaded once here so that a bad one fails before
    any actor starts; its weights' digest is part of the output's identity."""
    inputs = Inputs.output_of("prepare", cfg.data.prepared_url, storage, "prepared")
    if inputs.found["prepared"]["facts"]["format"] == "metadata":
        raise ValueError(
            f"data.prepared_url={inputs.record['prepared']} holds filtered LAION metadata, not images: download them "
            "with stage=download, then run stage=prepare on the downloads (stage=pipeline does both)"
        )
    first_stage = _first_stage(storage, model_location(cfg.stage.first_stage), cfg.stage.first_stage_subfolder)
    inputs.fingerprints.append(first_stage["sha256"])
    inputs.record["first_stage"] = first_stage["location"]
    inputs.found["first_stage"] = first_stage
    # The task's extra UNet input (super-resolution, inpainting) is encoded too, and makes other latents.
    concat = named_task(cfg.task.name).concat
    if concat == "low_res" and first_stage["latent_channels"] != 3:
        raise ValueError(
            f"task={cfg.task.name}: stage.first_stage={cfg.stage.first_stage} has "
            f"{first_stage['latent_channels']} latent channels; "
            "LDMSuperResolutionPipeline draws as many as the low-resolution image has, "
            "3 (as the paper's f=4 first stages). "
            "Train one with stage=train_autoencoder task=super_resolution (task.latent_channels=3)"
        )
    if concat:
        inputs.fingerprints.append(f"concat={concat}")
    inputs.found["concat"] = concat
    if cfg.stage.text_encoder:
        prepared = inputs.found["prepared"]
        tokenizer = f"{inputs.record['prepared']}/{prepared['facts']['tokenizer']['path'].strip('/')}"
        text_encoder, empty = _text_encoder(
            storage,
            model_location(cfg.stage.text_encoder),
            cfg.stage.text_encoder_subfolder,
            tokenizer,
            prepared["facts"]["tokenizer"]["max_length"],
        )
        inputs.fingerprints.append(text_encoder["sha256"])
        inputs.record["text_encoder"] = text_encoder["location"]
        inputs.found["text_encoder"], inputs.found["empty_text_embedding"] = text_encoder, empty
    return inputs


def _encode(job: Job) -> Output:
    storage, settings, out = job.storage, job.settings, job.out
    source, prepared, first_stage = (
        job.inputs.record["prepared"],
        job.inputs.found["prepared"],
        job.inputs.found["first_stage"],
    )
    text_encoder, concat = job.inputs.found.get("text_encoder"), job.inputs.found["concat"]
    _warn_if_decoding_fuses(settings.resources)
    started = time.time()
    shard_rows = _rows(prepared, source, "data")
    held_out_rows = _held_out_rows(prepared, source, settings.held_out_images)
    shards, held_out = list(shard_rows), list(held_out_rows)
    sources = shards + held_out
    expected = {remote.stem(url): rows for url, rows in {**shard_rows, **held_out_rows}.items()}
    encoding = _Encoding(storage, out)
    pending = encoding.resume(sources, expected)
    if pending:
        encoding.encode(pending, expected, first_stage, text_encoder, concat, settings)
    elapsed = time.time() - started
    finished = encoding.all_finished(sources)

    markers = [finished[remote.stem(s)] for s in shards]
    held_markers = [finished[remote.stem(s)] for s in held_out]
    rows_in, rows_out, held_rows, dropped = _counts(shards, expected, markers, held_markers)
    summary = _training_stats(markers).summary()
    encoding.clear_work()
    extra_files = {}
    if text_encoder:
        extra_files[EMPTY_TEXT_EMBEDDING] = encoding.write_bytes(
            EMPTY_TEXT_EMBEDDING, save({TEXT_EMBEDDING: job.inputs.found["empty_text_embedding"]})
        )
    rate = rows_in / max(elapsed, 1e-9)
    facts = _facts(job, markers, held_out, summary)
    return Output(
        counts={"rows_in": rows_in, "rows_out": rows_out, "held_out": held_rows, "dropped": dropped},
        facts=facts,
        schema=_schema(first_stage["kind"], text_encoder, concat),
        timings={"images_per_s": round(rate, 2)},
        expected_files={
            **{name: size for m in markers + held_markers for name, size in m["files"].items()},
            **extra_files,
        },
        row_groups={
            name: remote.row_groups(rows, settings.row_group_rows)
            for m in markers + held_markers
            for name, rows in m["file_rows"].items()
        },
        metrics={
            "rows_in": rows_in,
            "rows_out": rows_out,
            "held_out": held_rows,
            "images_per_s": rate,
            "scale_factor": summary["scale_factor"],
            **{f"dropped.{k}": v for k, v in dropped.items()},
        },
        message=f"{STAGE.name}: {rows_out} of {rows_in} images encoded in {elapsed:.1f}s ({rate:.1f} images/s), "
        f"dropped {dropped}, and {held_rows} held-out ones for train_ldm's held-out loss; "
        f"latents {facts['latent_shape']}, scale_factor {summary['scale_factor']:.4f}; at {out}",
    )


def _warn_if_decoding_fuses(resources: DictConfig) -> None:
    """Say so when the resources asked for let Ray Data fuse decoding into the encoder actors."""
    if resources.num_gpus_per_encoder == 0 and resources.num_cpus_per_decode_task == resources.num_cpus_per_encoder:
        print(
            f"{STAGE.name}: warning: decode tasks and encoder actors ask for the same resources, so Ray Data fuses "
            "decoding into the encoder actors, where it waits behind every forward; give "
            "stage.resources.num_cpus_per_decode_task another value"
        )


def _counts(
    shards: list[str], expected: dict[str, int], markers: list[dict[str, Any]], held_markers: list[dict[str, Any]]
) -> tuple[int, int, int, dict[str, int]]:
    """Training rows in and encoded, held-out rows encoded, and the rows dropped (per reason); an error when no
    training row was encoded."""
    rows_in = sum(expected[remote.stem(s)] for s in shards)
    rows_out = sum(m["rows"] for m in markers)
    held_rows = sum(m["rows"] for m in held_markers)
    dropped = {"undecodable": sum(m["undecodable"] for m in markers)}
    if rows_out == 0:
        raise RuntimeError(f"{STAGE.name}: none of the {rows_in} prepared images could be encoded ({dropped})")
    return rows_in, rows_out, held_rows, dropped


def _training_stats(markers: list[dict[str, Any]]) -> LatentStats:
    """The latents' statistics over the training rows only: scale_factor is theirs."""
    stats = LatentStats()
    for marker in markers:
        stats = stats.merge(LatentStats(**marker["stats"]))
    return stats


def _facts(job: Job, markers: list[dict[str, Any]], held_out: list[str], summary: dict[str, Any]) -> dict[str, Any]:
    """The manifest's facts: the layout, what made the latents and what they are, and what the training rows hold."""
    settings, source, prepared = job.settings, job.inputs.record["prepared"], job.inputs.found["prepared"]
    first_stage, text_encoder, concat = (
        job.inputs.found["first_stage"],
        job.inputs.found.get("text_encoder"),
        job.inputs.found["concat"],
    )
    side = settings.resolution // first_stage["factor"]
    return {
        "layout": {"data": f"{remote.SHARDS}/", **({"held_out": f"{remote.HELD_OUT}/"} if held_out else {})},
        "first_stage": first_stage,
        "resolution": settings.resolution,
        "latent_shape": [first_stage["latent_channels"], side, side],
        "latent_columns": list(latent_columns(first_stage["kind"])),
        # The frozen encoder whose τθ(y) the rows carry, and the empty caption's (caption dropout's) file.
        "text_encoder": {**text_encoder, "empty": EMPTY_TEXT_EMBEDDING} if text_encoder else None,
        "concat": concat,  # what the rows carry for a task that concatenates an image to z_t (ldm.tasks), or None
        **summary,
        # The classes the training rows name (labels, or in their boxes), sorted: a class's index is its place here.
        "classes": sorted({name for marker in markers for name in marker["classes"]}),
        "rows_with_boxes": sum(marker["laid_out"] for marker in markers),  # what a layout-to-image model needs
        "tokenizer": {
            **prepared["facts"]["tokenizer"],
            "path": f"{source}/{prepared['facts']['tokenizer']['path'].strip('/')}",
        },
    }


def _rows(prepared: dict[str, Any], source: str, part: str) -> dict[str, int]:
    """Each prepared file's rows, as prepare's manifest lists them: no file is opened to count them."""
    return {url: sum(groups) for url, groups in zip(*data_row_groups(prepared, source, part))}


def _held_out_rows(prepared: dict[str, Any], source: str, images: int) -> dict[str, int]:
    """The first of prepare's held-out files, whole, until they hold ``images`` rows: train_ldm's held-out loss
    reads no more, so neither is more encoded."""
    chosen: dict[str, int] = {}
    total = 0
    for url, rows in _rows(prepared, source, "held_out").items():
        if total >= images:
            break
        chosen[url], total = rows, total + rows
    return chosen


def _first_stage(storage: Storage, location: str, subfolder: str | None) -> dict[str, Any]:
    """Where the first stage's weights are and what identifies them. A train_autoencoder output is checked
    against its manifest and read from its model folder; anything else is a diffusers directory or hub id."""
    manifest = None if is_hub_id(location) else read_manifest(storage, location)
    if manifest is not None:
        verify(storage, location, stage="train_autoencoder")
        model_url = f"{location}/{manifest['facts']['model'].strip('/')}"
    else:
        model_url = location
    model = load_first_stage(model_url, storage, subfolder)  # fail here, not in every actor
    return {
        "location": model_url,
        "subfolder": subfolder,
        "class": type(model).__name__,
        "kind": kind(model),
        "factor": factor(model),
        "latent_channels": model.config.latent_channels,
        "sha256": weights_digest(model_url, storage, subfolder),
        "trained_by": manifest["fingerprint"] if manifest else None,
        "autoencoder": location if manifest else None,  # the train_autoencoder output: what it held out
    }


def _text_encoder(
    storage: Storage, location: str, subfolder: str | None, tokenizer_url: str, max_length: int
) -> tuple[dict[str, Any], Any]:
    """The frozen text encoder's identity, checked against the prepared tokens' tokenizer, and the empty
    caption's embedding (caption dropout's), computed here once."""
    model = load_text_encoder(location, storage, subfolder).eval()  # fail here, not in every actor
    tokenizer = load_tokenizer(tokenizer_url, storage)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"stage.text_encoder={location} knows {model.config.vocab_size} tokens, the prepared captions' tokenizer "
            f"({tokenizer_url}) {len(tokenizer)}: prepare with that encoder's tokenizer (stage=prepare "
            "stage.tokenizer.train=false stage.tokenizer.name_or_path=... stage.tokenizer.subfolder=...)"
        )
    empty = text_embeddings(model, tokenize(tokenizer, [""], max_length)[0], torch.device("cpu"))[0]
    facts = {
        "location": location,
        "subfolder": subfolder,
        "class": type(model).__name__,
        "sha256": weights_digest(location, storage, subfolder),
        "width": context_width(model),
        "max_length": max_length,
    }
    return facts, empty


def _requests(resources: DictConfig) -> list[Request]:
    """The encoder actors, and room beside them for a read, decode or write task: with every CPU held by the
    actors, those would wait forever (on a small machine Ray does not say so)."""
    encoder = {"CPU": resources.num_cpus_per_encoder, "GPU": resources.num_gpus_per_encoder}
    task = {"CPU": max(1.0, resources.num_cpus_per_decode_task, resources.num_cpus_per_write_task)}
    return [
        Request("stage.resources.encoder_concurrency", encoder, resources.encoder_concurrency),
        Request("a decode or write task (stage.resources.num_cpus_per_decode_task, num_cpus_per_write_task)", task),
    ]


def _schema(kind: str, text_encoder: dict[str, Any] | None, concat: str | None) -> dict[str, str]:
    schema = {
        "key": "string",
        "caption": "string",
        "input_ids": "fixed_size_list<int32>",
        "attention_mask": "fixed_size_list<int8>",
        "label": "string",
        "boxes": "string",
    }
    tensors = {
        c: "halffloat" for c in (*latent_columns(kind), *([TEXT_EMBEDDING] if text_encoder else []))
    } | CONCAT.get(concat, {})
    return {**schema, **{c: f"fixed_shape_tensor<{dtype}>" for c, dtype in tensors.items()}}


class _Encoding:
    """One encode_latents run's output location, its per-file done markers, and the Ray Data pipeline."""

    def __init__(self, storage: Storage, out: str):
        self.storage, self.out = storage, out
        self.fs, self.root = storage.fsspec(out)

    def finished(self) -> dict[str, dict[str, Any]]:
        return {marker["source"]: marker for marker in read_markers(self.storage, f"{self.out}/{WORK}/done")}

    def resume(self, sources: list[str], expected: dict[str, int]) -> list[str]:
        """The prepared files still to encode: a killed run's unfinished parts are removed first, and files
        without rows are marked done without encoding."""
        finished = self.finished()
        self.remove_unfinished_parts(finished)
        for empty in (s for s in sources if expected[remote.stem(s)] == 0 and remote.stem(s) not in finished):
            self.mark_done(remote.stem(empty), _empty_part())
        finished = self.finished()
        pending = [s for s in sources if remote.stem(s) not in finished]
        if finished:
            print(f"{STAGE.name}: resuming: {len(finished)} of {len(sources)} prepared file(s) already encoded")
        return pending

    def all_finished(self, sources: list[str]) -> dict[str, dict[str, Any]]:
        """Every prepared file's done marker; an error when one was not fully encoded."""
        finished = self.finished()
        missing = [s for s in sources if remote.stem(s) not in finished]
        if missing:
            raise RuntimeError(
                f"{STAGE.name}: {len(missing)} prepared file(s) were not fully encoded, e.g. {missing[:3]}"
            )
        return finished

    def remove_unfinished_parts(self, finished: dict[str, Any]) -> None:
        """Parts of a prepared file that was not finished (a killed run): it is encoded again from scratch."""
        for path in self.fs.glob(f"{self.root}/{remote.SHARDS}/*.parquet") + self.fs.glob(
            f"{self.root}/{remote.HELD_OUT}/*.parquet"
        ):
            if path.rsplit("/", 1)[-1].rsplit("-", 1)[0] not in finished:
                self.fs.rm(path)

    def write_bytes(self, name: str, data: bytes) -> int:
        with self.fs.open(f"{self.root}/{name}", "wb") as f:
            f.write(data)
        return len(data)

    def encode(
        self,
        pending: list[str],
        expected: dict[str, int],
        first_stage: dict[str, Any],
        text_encoder: dict[str, Any] | None,
        concat: str | None,
        settings: DictConfig,
    ) -> None:
        resources = settings.resources
        context = ray.data.DataContext.get_current()
        block_bytes = context.target_max_block_size
        context.target_max_block_size = int(resources.block_mb * 2**20)
        try:
            reports = self._reports(pending, first_stage, text_encoder, concat, settings)
            self._mark_files_as_reported(reports, pending, expected)
        finally:
            context.target_max_block_size = block_bytes

    def _reports(
        self,
        pending: list[str],
        first_stage: dict[str, Any],
        text_encoder: dict[str, Any] | None,
        concat: str | None,
        settings: DictConfig,
    ) -> ray.data.Dataset:
        """The Ray Data pipeline, not yet run: decode tasks, encoder actors and writer tasks, whose reports (one
        per part written) come out."""
        resources = settings.resources
        # A block, so a decode task, per file: files finish, and are marked, one by one.
        files = ray.data.from_items([{"path": url} for url in pending], override_num_blocks=len(pending))
        return (
            files.map_batches(
                partial(
                    remote.decode,
                    storage=self.storage,
                    resolution=settings.resolution,
                    batch_rows=resources.decode_batch_size,
                    concat=concat,
                    latent_side=settings.resolution // first_stage["factor"],
                ),
                batch_format="pyarrow",
                batch_size=1,
                num_cpus=resources.num_cpus_per_decode_task,
                label_selector=_selector(resources.decode_label_selector),
            )
            .map_batches(
                Encoder,
                fn_constructor_kwargs=self._encoder_arguments(first_stage, text_encoder, concat, settings),
                compute=ray.data.ActorPoolStrategy(size=resources.encoder_concurrency),
                batch_format="pyarrow",
                batch_size=resources.encoder_batch_size,
                num_cpus=resources.num_cpus_per_encoder,
                num_gpus=resources.num_gpus_per_encoder,
                label_selector=_selector(resources.encoder_label_selector),
            )
            .map_batches(
                partial(
                    remote.write,
                    storage=self.storage,
                    out=self.out,
                    compression=str(settings.compression),
                    row_group_rows=settings.row_group_rows,
                ),
                batch_format="pyarrow",
                batch_size=None,
                num_cpus=resources.num_cpus_per_write_task,
            )
        )

    def _encoder_arguments(
        self,
        first_stage: dict[str, Any],
        text_encoder: dict[str, Any] | None,
        concat: str | None,
        settings: DictConfig,
    ) -> dict[str, Any]:
        """What each encoder actor is built with."""
        resources = settings.resources
        return {
            "first_stage": first_stage["location"],
            "subfolder": first_stage["subfolder"],
            "storage": self.storage,
            "device": encoder_device(resources.num_gpus_per_encoder),
            "dtype": str(resources.dtype),
            "threads": int(max(1, resources.num_cpus_per_encoder)),
            "resolution": settings.resolution,
            "release_every": resources.release_memory_every,
            "text_encoder": text_encoder["location"] if text_encoder else None,
            "text_encoder_subfolder": text_encoder["subfolder"] if text_encoder else None,
            "concat": concat,
        }

    def _mark_files_as_reported(self, reports: ray.data.Dataset, pending: list[str], expected: dict[str, int]) -> None:
        """Run the pipeline, counting each prepared file's rows as the writers report them: a file is marked done
        when all its rows are written or dropped."""
        seen: dict[str, int] = defaultdict(int)
        parts: dict[str, dict[str, Any]] = defaultdict(_empty_part)
        total = sum(expected[remote.stem(s)] for s in pending)
        with tqdm(total=total, desc=f"{STAGE.name}: images", unit="img") as progress:
            for report in reports.iter_rows():
                stem = remote.stem(report["source"])
                part = parts[stem]
                _add_report(part, report)
                seen[stem] += report["rows"] + report["undecodable"]
                progress.update(report["rows"] + report["undecodable"])
                if seen[stem] == expected[stem]:
                    self.mark_done(stem, part)
                elif seen[stem] > expected[stem]:
                    raise RuntimeError(
                        f"{STAGE.name}: {report['source']} reported {seen[stem]} rows, it has {expected[stem]}"
                    )

    def mark_done(self, stem: str, part: dict[str, Any]) -> None:
        write_marker(
            self.storage, f"{self.out}/{WORK}/done", stem, {**part, "source": stem, "stats": vars(part["stats"])}
        )

    def clear_work(self) -> None:
        clear(self.storage, f"{self.out}/{WORK}")


def _empty_part() -> dict[str, Any]:
    """A source's part before any of its rows are reported: what it wrote and dropped, and what its rows hold."""
    return {
        "files": {},
        "file_rows": {},
        "rows": 0,
        "undecodable": 0,
        "stats": LatentStats(),
        "classes": [],
        "laid_out": 0,
    }


def _add_report(part: dict[str, Any], report: dict[str, Any]) -> None:
    """One writer's report added to its source's part: the file it wrote, its rows, their statistics and classes."""
    if report["file"]:
        part["files"][report["file"]] = report["size"]
        part["file_rows"][report["file"]] = report["rows"]
    part["rows"] += report["rows"]
    part["undecodable"] += report["undecodable"]
    stats = LatentStats(report["count"], list(report["sum"]), list(report["sum_sq"]), list(report["sum_var"]))
    part["stats"] = part["stats"].merge(stats)
    part["classes"] = sorted({*part["classes"], *report["classes"]})
    part["laid_out"] += report["laid_out"]


def _selector(labels: DictConfig | None) -> dict[str, str] | None:
    return plain(labels) if labels else None
