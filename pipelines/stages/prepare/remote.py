"""What stage=prepare runs on Ray workers: one input file (unit) or one hash partition per call.

Kept apart from the stage module so that workers import pyarrow and ``ldm``, not MLflow, Hydra or the driver.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ldm.data import filters
from ldm.data.parts import PartWriter
from ldm.data.prepare import prepare_unit, scan_unit
from ldm.data.sources import MissingColumnError, Unit, UnreadableInputError
from ldm.markers import write_marker
from ldm.storage import Storage

TOKENIZER = "tokenizer"
DROPPED = "dropped"  # every dropped row with its reason, beside the kept ones
HELD_OUT = "held_out"  # the kept rows no training stage reads
RANK = {reason: rank for rank, reason in enumerate(filters.REASONS)}


@contextmanager
def naming(unit: Unit) -> Iterator[None]:
    """Any failure on a unit says which file it was (the ldm errors that already do pass through)."""
    try:
        yield
    except (MissingColumnError, UnreadableInputError):
        raise
    except Exception as error:
        part = f" (row groups {unit.row_groups[0]}-{unit.row_groups[1] - 1})" if unit.row_groups else ""
        raise RuntimeError(f"stage=prepare failed on {unit.path}{part}: {type(error).__name__}: {error}") from error


def scan(batch: pa.Table, *, storage, fmt, columns, filters, batch_rows) -> Iterator[pa.Table]:
    """The rows of one unit that pass the metadata rules: their caption and deduplication keys."""
    for row in batch.to_pylist():
        unit = Unit(**row)
        with naming(unit):
            for table in scan_unit(storage, unit, fmt, columns, filters, batch_rows):
                kept = table.filter(pc.is_null(table["reason"]))
                if len(kept):
                    yield kept.drop_columns(["reason"])


def dedup_keys(batch: pa.Table, rules: dict[str, str]) -> pa.Table:
    return filters.dedup_keys(batch, rules)


def duplicates(partition: pa.Table) -> pa.Table:
    """The later rows of each key in one hash partition, with the rule they fail."""
    return filters.later_duplicates(partition).select(["unit", "row", "reason"])


def prepare(row: dict[str, Any], *, job: dict[str, Any]) -> dict[str, Any]:
    """One unit through every rule: its parts (stale ones from a killed run removed first), then its marker."""
    from ldm.text.tokenizer import load_tokenizer  # here, not at the top: scan workers never need torch

    storage: Storage = job["storage"]
    unit = Unit(**row)
    fs, root = storage.fsspec(job["out"])
    stem = f"part-{unit.index:0{job['digits']}d}"
    held_out = job["held_out"]  # None for metadata: its rows have no key yet
    for layout in (job["layout"], DROPPED, HELD_OUT):
        for stale in fs.glob(f"{root}/{layout}/{stem}-*.parquet"):
            fs.rm(stale)
    writer, dropped, held_writer = (
        PartWriter(storage, f"{job['out']}/{layout}", stem, job["max_rows"], job["max_bytes"])
        for layout in (job["layout"], DROPPED, HELD_OUT)
    )
    with naming(unit):
        summary = prepare_unit(
            storage,
            unit,
            job["fmt"],
            job["columns"],
            job["filters"],
            duplicates_of(storage, job["work"], unit.index),
            # Metadata is tokenized only to count tokens: otherwise spare the worker loading transformers.
            load_tokenizer(f"{job['out']}/{TOKENIZER}", storage)
            if job["fmt"] != "metadata" or job["filters"].counts_tokens
            else None,
            job["max_length"],
            writer,
            dropped,
            job["batch_rows"],
            held_out,
            held_writer if held_out is not None else None,
        )
    write_marker(storage, f"{job['work']}/done", f"{unit.index:0{job['digits']}d}", summary)
    return {"unit": unit.index, "rows_out": summary["rows_out"]}


def duplicates_of(storage: Storage, work: str, unit: int) -> dict[int, str]:
    """row -> reason for the unit's rows that repeat an earlier row (the earlier rule in REASONS wins)."""
    fs, root = storage.fsspec(work)
    if not fs.exists(f"{root}/duplicates.done"):  # never prepare a unit as if it had no duplicates
        raise RuntimeError(f"{work}: the duplicates step has not finished; re-run the stage")
    found: dict[int, str] = {}
    for path in sorted(fs.glob(f"{root}/duplicates/unit={unit}/*.parquet")):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["row", "reason"])
        for row, reason in zip(table["row"].to_pylist(), table["reason"].to_pylist()):
            if row not in found or RANK[reason] < RANK[found[row]]:
                found[row] = reason
    return found
