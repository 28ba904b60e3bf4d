"""Per-file "done" markers in an output's scratch space: how a killed stage knows what it already finished
(written by the tasks that finish a file, read by the stage that resumes)."""

from __future__ import annotations

import json
from typing import Any

from ldm.storage import Storage


def write_marker(storage: Storage, folder: str, name: str, payload: dict[str, Any]) -> None:
    """``<folder>/<name>.json``, whole or not at all."""
    fs, root = storage.fsspec(folder)
    fs.makedirs(root, exist_ok=True)
    path, data = f"{root}/{name}.json", json.dumps(payload).encode()
    if storage.is_local(folder):  # a kill mid-write must not leave a marker that parses
        fs.pipe_file(f"{path}.tmp", data)
        fs.mv(f"{path}.tmp", path)
    else:
        fs.pipe_file(path, data)  # a single PUT is atomic


def read_markers(storage: Storage, folder: str) -> list[dict[str, Any]]:
    fs, root = storage.fsspec(folder)
    markers = []
    for path in fs.glob(f"{root}/*.json"):
        try:
            markers.append(json.loads(fs.cat_file(path)))
        except ValueError:
            continue  # cut short by a kill: what it stood for is redone
    return markers
