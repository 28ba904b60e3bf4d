"""What stage=download runs on Ray workers: one img2dataset shard per task."""

from __future__ import annotations

import json
from typing import Any

from ldm.data.download import Shard, download_shard


def download(item: dict[str, Any], *, job: dict[str, Any]) -> dict[str, Any]:
    """One shard downloaded (or, finished before, read back): the outcome of each of its rows."""
    shard = Shard(item["index"], tuple(tuple(p) for p in json.loads(item["pieces"])))
    try:
        outcomes = download_shard(
            job["storage"], shard, item["name"], job["out"], job["columns"], job["carried"], job["options"]
        )
    except Exception as error:  # say which shard, and which metadata rows it is
        raise RuntimeError(
            f"stage=download failed on shard {item['name']} (rows {shard.pieces}): {type(error).__name__}: {error}"
        ) from error
    return {"name": item["name"], "outcomes": json.dumps(dict(outcomes))}
