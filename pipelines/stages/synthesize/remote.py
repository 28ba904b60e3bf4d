"""What stage=synthesize runs on Ray workers: one img2dataset shard per task."""

from __future__ import annotations

import json
from typing import Any

from ldm.storage import Storage
from ldm.synthetic.corpus import img2dataset_shard


def write_shard(
    item: dict[str, Any], *, storage: Storage, url: str, jpeg_quality: int, formats: list[str]
) -> dict[str, Any]:
    """Render, encode and write one img2dataset shard in every configured format; what was written."""
    rows = json.loads(item["rows"])
    fs, root = storage.fsspec(url)
    files = img2dataset_shard(rows, jpeg_quality, formats)
    for name, payload in files.items():
        path = f"{root}/{name}"
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, payload)
    images = sum(1 for r in rows if r["defect"] != "failed_download")
    return {"shard": item["shard"], "images": images, "files": json.dumps({n: len(p) for n, p in files.items()})}
