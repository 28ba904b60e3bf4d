from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial
from typing import Any

import mlflow
import pyarrow.dataset
import pyarrow.parquet as pq
import ray
from omegaconf import DictConfig

from ldm.data.download import download_command
from ldm.data.filters import REASONS, Filters
from ldm.data.prepare import PREPARE_VERSION, HeldOut, prepared_schema, unused_rules
from ldm.data.sources import Columns, Unit, available_columns, checked, list_units, readable
from ldm.manifest import CLAIM_NAME, IncompleteOutputError, clear, list_files, read_manifest, verify
from ldm.markers import read_markers
from ldm.storage import Storage, resolve
from ldm.text.tokenizer import load_tokenizer, save_tokenizer, train_wordpiece
from pipelines.driver.cluster import Request
from pipelines.driver.config import plain
from pipelines.driver.stage import Inputs, Job, Output, Stage
from pipelines.stages.prepare import remote
from pipelines.worker.console import ProgressLine

STAGE = Stage(
    "prepare",
    version=PREPARE_VERSION,
    output_url=lambda cfg: cfg.data.prepared_url,
    resume=True,
    detail="{rows_out} rows",
    requests=lambda cfg: [Request("stage.resources.num_cpus_per_task", {"CPU": cfg.stage.resources.num_cpus_per_task})],
)
WORK = "_work"
TOKENIZER = remote.TOKENIZER


class EmptyOutputError(RuntimeError):
    """Every row was filtered out."""


def run(cfg: DictConfig) -> dict[str, Any]:
    return STAGE.run(cfg, _inputs, _prepare)


def _inputs(cfg: DictConfig, storage: Storage) -> Inputs:
    """The input files, checked (columns, readable) before anything starts; the upstream output's fingerprint
    when the input is one of ours, else the listing's."""
    fmt = str(cfg.data.input.format)
    columns = Columns.from_config(plain(cfg.data.input))
    columns.validate(fmt)
    filters = Filters.from_config(plain(cfg.stage.filters))
    source, upstream = _input_location(storage, resolve(cfg.data.input.url), fmt)
    units, listing = list_units(storage, source, fmt, cfg.stage.rows_per_task)
    # The optional columns the first file lacks are taken as absent from the whole input: every task then
    # checks its own file against the same columns.
    have = readable(lambda: available_columns(storage, units[0], columns), units[0])
    columns, absent = columns.resolved(have)
    checked(storage, units[0], columns, fmt, have)
    return Inputs(
        fingerprints=[upstream or listing],
        record={
            "url": source,
            "format": fmt,
            "fingerprint": upstream,
            "listing": listing,
            "files": len({u.path for u in units}),
            "units": len(units),
        },
        found={"units": units, "columns": columns, "filters": filters, "absent": absent},
    )


def _prepare(job: Job) -> Output:
    storage, out, settings = job.storage, job.out, job.settings
    units, columns, filters = job.inputs.found["units"], job.inputs.found["columns"], job.inputs.found["filters"]
    fmt = job.inputs.record["format"]
    started = time.time()
    work = _Steps(storage, out, fmt, columns, filters, settings)
    unused = _announce(job)
    timings, (tokenizer_files, vocab_size), summaries = _run_steps(work, units)
    elapsed = time.time() - started

    rows_in, rows_out, held_out, dropped = _totals(summaries)
    _report(rows_in, rows_out, dropped, unused, timings, elapsed)
    if work.held_out is not None:
        print(
            f"{STAGE.name}: {held_out} of the {rows_out} kept rows held out from training "
            f"(fraction {work.held_out.fraction}, by key) in {remote.HELD_OUT}/"
        )
    if rows_out == 0:
        raise EmptyOutputError(
            f"prepare: every one of the {rows_in} input rows was filtered out (dropped per rule: "
            f"{ {r: n for r, n in dropped.items() if n} }); loosen stage.filters or check data.input"
        )

    work.clear_work()
    facts = _facts(fmt, work, settings, unused, vocab_size, held_out)
    message = ""
    if fmt == "metadata":
        facts["img2dataset_command"], message = _download_command(job)
    return Output(
        counts={"rows_in": rows_in, "rows_out": rows_out, "held_out": held_out, "dropped": dropped},
        facts=facts,
        schema=None
        if fmt == "metadata"
        else {f.name: str(f.type) for f in prepared_schema(settings.tokenizer.max_length)},
        timings=timings,
        expected_files={
            **_written_files(work.layout, summaries),
            **{f"{TOKENIZER}/{n}": s for n, s in tokenizer_files.items()},
        },
        row_groups=_row_groups(work.layout, summaries),
        metrics={
            "rows_in": rows_in,
            "rows_out": rows_out,
            "held_out": held_out,
            "rows_per_s": rows_in / max(elapsed, 1e-9),
            "vocab_size": vocab_size,
            **{f"dropped.{reason}": n for reason, n in dropped.items()},
        },
        message=message,
    )


def _announce(job: Job) -> dict[str, str]:
    """Say what is prepared from where, and which rules this input leaves off; return those rules (and why)."""
    units, columns, filters = job.inputs.found["units"], job.inputs.found["columns"], job.inputs.found["filters"]
    fmt, files = job.inputs.record["format"], job.inputs.record["files"]
    split = f" in {len(units)} tasks" if len(units) != files else ""
    print(f"prepare: {files} {fmt} file(s){split} from {job.inputs.record['url']} -> {job.out}")
    unused = unused_rules(fmt, columns, filters, job.inputs.found["absent"])
    if unused:
        print(f"prepare: rules off for this input: {', '.join(f'{rule} ({why})' for rule, why in unused.items())}")
    return unused


def _run_steps(
    work: _Steps, units: list[Unit]
) -> tuple[dict[str, float], tuple[dict[str, int], int], list[dict[str, Any]]]:
    """Scan, deduplicate, tokenizer, prepare, in that order, each timed: the seconds of each, the tokenizer's
    (files, vocabulary size), and each unit's summary."""
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}
    for step, run_step in (
        ("scan", partial(work.scan, units)),
        ("duplicates", work.find_duplicates),
        ("tokenizer", work.tokenizer),
        ("prepare", partial(work.prepare, units)),
    ):
        begun = time.time()
        results[step] = run_step()
        timings[step] = round(time.time() - begun, 3)
    return timings, results["tokenizer"], results["prepare"]


def _totals(summaries: list[dict[str, Any]]) -> tuple[int, int, int, dict[str, int]]:
    """Rows in, kept, held out, and dropped per rule (every rule, in ``REASONS`` order), over all units."""
    rows_in = sum(s["rows_in"] for s in summaries)
    rows_out = sum(s["rows_out"] for s in summaries)
    held_out = sum(s.get("held_out", 0) for s in summaries)
    dropped = Counter()
    for s in summaries:
        dropped.update(s["dropped"])
    return rows_in, rows_out, held_out, {reason: dropped.get(reason, 0) for reason in REASONS}


def _facts(
    fmt: str, work: _Steps, settings: DictConfig, unused: dict[str, str], vocab_size: int, held_out: int
) -> dict[str, Any]:
    """The manifest's facts: the output's layout, its tokenizer, the rules left off, and the held-out split."""
    facts: dict[str, Any] = {
        "format": fmt,
        "layout": {"data": f"{work.layout}/", "dropped": f"{remote.DROPPED}/", "tokenizer": f"{TOKENIZER}/"},
        "tokenizer": {"path": f"{TOKENIZER}/", "vocab_size": vocab_size, "max_length": settings.tokenizer.max_length},
        "unused_rules": unused,
    }
    if work.held_out is not None:
        facts["layout"]["held_out"] = f"{remote.HELD_OUT}/"
        facts["held_out"] = {**asdict(work.held_out), "rows": held_out}
    return facts


def _download_command(job: Job) -> tuple[str, str]:
    """For filtered metadata: the img2dataset command that downloads the kept rows (logged to the run too), and
    the message that says how to run it."""
    cfg, settings = job.cfg, job.settings
    command = download_command(
        f"{job.out}/metadata",
        resolve(cfg.data.images_url),
        job.inputs.found["columns"],
        job.inputs.found["filters"],
        plain(settings.img2dataset),
        plain(cfg.data.input.extra_columns),
    )
    mlflow.log_text(command + "\n", "img2dataset_command.txt")
    message = (
        f"prepare: download the kept rows on this Ray cluster with stage=download data={cfg.data.name} (the same "
        f"overrides), or stage=pipeline for every step to a model; by hand, with\n  {command}"
    )
    return command, message


def _written_files(layout: str, summaries: list[dict[str, Any]]) -> dict[str, int]:
    """The size of every file the units wrote: kept, dropped and held-out rows."""
    files = {f"{layout}/{name}": size for s in summaries for name, size in s["files"].items()}
    files.update({f"{remote.DROPPED}/{name}": size for s in summaries for name, size in s["dropped_files"].items()})
    files.update(
        {f"{remote.HELD_OUT}/{name}": size for s in summaries for name, size in s.get("held_out_files", {}).items()}
    )
    return files


def _row_groups(layout: str, summaries: list[dict[str, Any]]) -> dict[str, list[int]]:
    """The row groups of every kept and held-out file the units wrote."""
    return {
        f"{folder}/{name}": groups
        for folder, part in ((layout, "row_groups"), (remote.HELD_OUT, "held_out_row_groups"))
        for s in summaries
        for name, groups in s[part].items()
    }


def _input_location(storage: Storage, url: str, fmt: str) -> tuple[str, str | None]:
    """Where the ``fmt`` files are, and the upstream output's fingerprint when ``url`` is one of ours.

    A stage output (a synthesized corpus) says in its manifest where each format lives; an output that never
    finished is refused. Anything else (real downloads) is read as it is, and fingerprinted by its listing.
    """
    fs, root = storage.fsspec(url)
    try:
        manifest = read_manifest(storage, url)
        claimed = manifest is None and fs.exists(f"{root}/{CLAIM_NAME}")
    except Exception as error:  # unreachable endpoint, no permission: say which URL
        raise OSError(f"cannot read data.input.url={url}: {type(error).__name__}: {error}") from error
    if manifest is not None:
        verify(storage, url)
        layout = (manifest.get("facts") or {}).get("layout") or {}
        if not layout.get(fmt):
            have = sorted(k for k, v in layout.items() if v and k in ("metadata", "parquet", "webdataset"))
            raise ValueError(
                f"data.input.url={url} is a {manifest.get('stage')} output without {fmt} data "
                f"(it has {have}); set data.input.format to one of them"
            )
        folder = layout[fmt].strip("/").removeprefix(".")  # "./": the output's own folder (a download)
        return f"{url}/{folder}" if folder else url, manifest["fingerprint"]
    if claimed:
        claim = json.loads(fs.cat_file(f"{root}/{CLAIM_NAME}"))
        raise IncompleteOutputError(
            f"data.input.url={url} is an unfinished {claim.get('stage')} output: re-run stage={claim.get('stage')}"
        )
    return url, None


class _Steps:
    """The steps of one prepare run, sharing its locations and settings."""

    def __init__(self, storage: Storage, out: str, fmt: str, columns: Columns, filters: Filters, settings: DictConfig):
        self.storage, self.out, self.fmt, self.columns, self.filters = storage, out, fmt, columns, filters
        self.settings = settings
        self.resources = settings.resources
        self.work = f"{out}/{WORK}"
        self.fs, self.root = storage.fsspec(out)
        self.layout = "metadata" if fmt == "metadata" else "shards"
        # Images are split once, here, by key: every later stage reads shards/ to train, held_out/ to measure.
        self.held_out = None if fmt == "metadata" else HeldOut(**plain(settings.held_out))

    # -- 1. scan ----------------------------------------------------------------------------------------------
    def scan(self, units: list[Unit]) -> None:
        if self._finished("keys"):
            return
        target = f"{self.work}/keys"
        clear(self.storage, target)
        scan = partial(
            remote.scan,
            storage=self.storage,
            fmt=self.fmt,
            columns=self.columns,
            filters=self.filters,
            batch_rows=self.resources.batch_rows,
        )
        pafs, path = self.storage.pyarrow(target)
        (
            ray.data.from_items([asdict(u) for u in units], override_num_blocks=len(units))
            .map_batches(scan, batch_size=1, batch_format="pyarrow", num_cpus=self.resources.num_cpus_per_task)
            .write_parquet(path, filesystem=pafs)
        )
        self._finish("keys")

    def _keys(self) -> pyarrow.dataset.Dataset | None:
        pafs, path = self.storage.pyarrow(f"{self.work}/keys")
        if not list_files(self.storage, f"{self.work}/keys"):
            return None  # no row passed the metadata rules
        return pyarrow.dataset.dataset(path, filesystem=pafs, format="parquet")

    # -- 2. deduplicate ---------------------------------------------------------------------------------------
    def find_duplicates(self) -> None:
        if self._finished("duplicates"):
            return
        target = f"{self.work}/duplicates"
        clear(self.storage, target)
        unused = unused_rules(self.fmt, self.columns, self.filters)
        rules = {
            key: reason
            for key, reason, on in (
                ("sample_key", "duplicate_key", True),  # the prepared-shard contract: keys are unique
                ("url_key", "duplicate_url", self.filters.dedup_urls),
                ("image_key", "duplicate_image", self.filters.dedup_images),
            )
            if on and reason not in unused
        }
        keys = self._keys() if rules else None
        pafs, path = self.storage.pyarrow(target)
        columns = ["unit", "row", *rules]
        if keys is not None and keys.count_rows() <= self.resources.dedup_on_driver_max_rows:
            # Few enough keys to hold here: the same two functions, without a distributed shuffle's start-up.
            found = remote.duplicates(remote.dedup_keys(keys.to_table(columns=columns), rules=rules))
            pq.write_to_dataset(found, path, partition_cols=["unit"], filesystem=pafs)
        elif keys is not None:
            (
                ray.data.read_parquet(keys.files, filesystem=pafs, columns=columns)
                .map_batches(partial(remote.dedup_keys, rules=rules), batch_format="pyarrow")
                # Hash partitions hold every row of a key; with batch_size=None a batch is a whole partition,
                # the same guarantee Ray's own groupby().map_groups() relies on.
                .repartition(self.resources.dedup_partitions, keys=["key"])
                .map_batches(remote.duplicates, batch_size=None, batch_format="pyarrow")
                # Then each unit's duplicates in one block: one file per unit, not one per (partition, unit).
                .repartition(self.resources.dedup_partitions, keys=["unit"])
                .write_parquet(path, filesystem=pafs, partition_cols=["unit"])
            )
        self._finish("duplicates")

    # -- 3. tokenizer -----------------------------------------------------------------------------------------
    def tokenizer(self) -> tuple[dict[str, int], int]:
        """Train or load the tokenizer, save it into the output (once: a resumed run reuses it)."""
        url = f"{self.out}/{TOKENIZER}"
        config = self.settings.tokenizer
        if not self._finished(TOKENIZER):
            if config.train:
                tokenizer = train_wordpiece(
                    self._training_captions(config.train_max_captions),
                    vocab_size=config.vocab_size,
                    max_length=config.max_length,
                    lowercase=config.lowercase,
                    min_frequency=config.min_frequency,
                )
            else:
                tokenizer = load_tokenizer(config.name_or_path, self.storage, config.subfolder)
            clear(self.storage, url)
            save_tokenizer(tokenizer, self.storage, url)
            self._finish(TOKENIZER)
        tokenizer = load_tokenizer(url, self.storage)
        print(f"{STAGE.name}: tokenizer at {url}: {len(tokenizer)} tokens, max_length {config.max_length}")
        return list_files(self.storage, url), len(tokenizer)

    def _training_captions(self, limit: int) -> Iterator[str]:
        keys = self._keys()
        if keys is None:
            return
        seen = 0
        for batch in keys.to_batches(columns=["caption"], batch_size=4096):
            for caption in batch["caption"].to_pylist():
                if caption:
                    yield caption
                    seen += 1
                    if seen >= limit:
                        return

    # -- 4. prepare -------------------------------------------------------------------------------------------
    def prepare(self, units: list[Unit]) -> list[dict[str, Any]]:
        finished = self._done_units()
        todo = [u for u in units if u.index not in finished]
        if finished:
            print(f"{STAGE.name}: resuming: {len(finished)} of {len(units)} file(s) already prepared")
        if todo:
            task = partial(
                remote.prepare,
                job={
                    "storage": self.storage,
                    "out": self.out,
                    "work": self.work,
                    "fmt": self.fmt,
                    "columns": self.columns,
                    "filters": self.filters,
                    "max_length": self.settings.tokenizer.max_length,
                    "max_rows": self.settings.max_rows_per_file,
                    "max_bytes": self.settings.max_bytes_per_file,
                    "batch_rows": self.resources.batch_rows,
                    "digits": max(5, len(str(len(units)))),
                    "layout": self.layout,
                    "held_out": self.held_out,
                },
            )
            prepared = (
                ray.data.from_items([asdict(u) for u in todo], override_num_blocks=len(todo))
                .map(task, num_cpus=self.resources.num_cpus_per_task)
                .iter_rows()
            )
            progress = ProgressLine(STAGE.name, len(todo), unit="file")
            for done, _ in enumerate(prepared, 1):
                progress.update(done)
        done = self._done_units()
        missing = [u.path for u in units if u.index not in done]
        if missing:
            raise IncompleteOutputError(
                f"{STAGE.name}: {len(missing)} input file(s) were not prepared, e.g. {missing[:3]}"
            )
        return [done[u.index] for u in units]

    def _done_units(self) -> dict[int, dict[str, Any]]:
        return {summary["unit"]: summary for summary in read_markers(self.storage, f"{self.work}/done")}

    def clear_work(self) -> None:
        """Remove the scratch space, markers first: a kill in the middle then leaves nothing that claims to
        be finished while the data it stands for is half gone (units before steps, so that no finished unit
        outlives the tokenizer and duplicates it was made with)."""
        for path in self.fs.glob(f"{self.root}/{WORK}/done/*.json"):
            self.fs.rm(path)
        for path in self.fs.glob(f"{self.root}/{WORK}/*.done"):
            self.fs.rm(path)
        clear(self.storage, self.work)

    # -- step markers -----------------------------------------------------------------------------------------
    def _finished(self, step: str) -> bool:
        return self.fs.exists(f"{self.root}/{WORK}/{step}.done")

    def _finish(self, step: str) -> None:
        self.fs.makedirs(f"{self.root}/{WORK}", exist_ok=True)
        self.fs.pipe_file(f"{self.root}/{WORK}/{step}.done", b"")


def _report(
    rows_in: int,
    rows_out: int,
    dropped: dict[str, int],
    unused: dict[str, str],
    timings: dict[str, float],
    seconds: float,
) -> None:
    width = max(len(r) for r in REASONS)
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    lines = [
        f"{STAGE.name}: {rows_in} rows in, {rows_out} kept, {sum(dropped.values())} dropped in {seconds:.1f}s ({steps})"
    ]
    for reason, n in dropped.items():
        note = f"  (off: {unused[reason]})" if reason in unused else ""
        lines.append(f"  {reason:<{width}} {n:>10}{note}")
    print("\n".join(lines))
