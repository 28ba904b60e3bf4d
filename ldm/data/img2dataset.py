"""The img2dataset command that downloads what the metadata pass of stage=prepare kept."""

from __future__ import annotations

import json
import shlex
from typing import Any, Mapping, Sequence

from ldm.data.filters import Filters
from ldm.data.sources import Columns


def download_command(
    metadata_url: str,
    output_url: str,
    columns: Columns,
    filters: Filters,
    options: Mapping[str, Any],
    extra_columns: Sequence[str] = (),
) -> str:
    """An ``img2dataset`` command line for the filtered metadata at ``metadata_url``.

    JPEGs are kept as served (``--resize_mode no --skip_reencode``: decoded to check their size, never
    re-encoded): prepare keeps the original bytes, and encode_latents resizes once, to the training resolution. The additional columns carry the
    metadata the second prepare pass filters on; ``--compute_hash sha256`` feeds its duplicate-image rule.
    """
    extra = [c for c in (columns.nsfw, columns.similarity, columns.width, columns.height) if c] + list(extra_columns)
    args: dict[str, Any] = {
        "url_list": metadata_url,
        "input_format": "parquet",
        "url_col": columns.url,
        "caption_col": columns.caption,
        "output_format": options["output_format"],
        "output_folder": output_url,
        "processes_count": options["processes_count"],
        "thread_count": options["thread_count"],
        "number_sample_per_shard": options["number_sample_per_shard"],
        "resize_mode": "no",
        "skip_reencode": True,
        "compute_hash": "sha256",
        "enable_wandb": False,
    }
    if extra:
        args["save_additional_columns"] = json.dumps(list(dict.fromkeys(extra)))
    if filters.min_width is not None or filters.min_height is not None:
        args["min_image_size"] = min(v for v in (filters.min_width, filters.min_height) if v is not None)
    if filters.max_aspect_ratio is not None:
        args["max_aspect_ratio"] = filters.max_aspect_ratio
    return "img2dataset " + " ".join(f"--{name} {shlex.quote(str(value))}" for name, value in args.items())
