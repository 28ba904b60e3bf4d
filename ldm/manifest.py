"""Stage outputs are committed by a ``_manifest.json`` written last.

An output directory without a manifest is incomplete: nothing reads it, and re-running its stage redoes or
resumes it. A manifest lists every file of the output with its size, so a later reader can verify that what it
is about to consume is what the stage wrote.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ldm.storage import Storage

MANIFEST_NAME = "_manifest.json"
# Written when a stage claims a location, and kept: it says a stage of this pipeline owns the files there, so
# a partial output can be cleared, while a location without it (real downloads given by mistake) never is.
CLAIM_NAME = "_claim.json"
FORMAT_VERSION = 1


class IncompleteOutputError(RuntimeError):
    """A stage output that has no manifest, or whose files do not match it."""


def fingerprint(stage_config: Mapping[str, Any], input_fingerprints: Iterable[str] = ()) -> str:
    """Identity of a stage output: its resolved stage config plus the identities of its inputs."""
    payload = json.dumps({"config": stage_config, "inputs": sorted(input_fingerprints)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def list_files(storage: Storage, url: str) -> dict[str, int]:
    """Relative path -> size of every file under ``url`` except the manifest."""
    fs, root = storage.fsspec(url)
    if not fs.exists(root):
        return {}
    files = {}
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(root) :].strip("/")
        # Object stores may hold empty "dir/" marker objects (pyarrow's create_dir writes them): not files.
        if (
            rel
            and info.get("type") != "directory"
            and not path.endswith("/")
            and rel not in (MANIFEST_NAME, CLAIM_NAME)
        ):
            files[rel] = int(info["size"])
    return files


def write_manifest(
    storage: Storage,
    url: str,
    *,
    stage: str,
    fingerprint: str,
    expected_files: Mapping[str, int] | None = None,
    **facts: Any,
) -> dict[str, Any]:
    """Commit the output at ``url``: call only after every other file of it is written.

    ``expected_files`` (relative path -> size, as the writers reported them) must all be visible from here:
    a writer on another node whose "local" disk is not this one's must not yield a complete-looking output.
    """
    files = list_files(storage, url)
    if expected_files is not None:
        wrong = sorted(f for f, size in expected_files.items() if files.get(f) != size)
        if wrong:
            raise IncompleteOutputError(
                f"{url}: {len(wrong)} file(s) written by workers are not visible here, e.g. {wrong[:3]}; "
                "is the storage shared by every node? (use storage=s3 on a multi-node cluster)"
            )
    manifest = {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "fingerprint": fingerprint,
        "url": url,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **facts,
        "files": files,
    }
    fs, root = storage.fsspec(url)
    payload = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    if storage.is_local(url):
        # A crash mid-write must not leave a truncated manifest: write aside, then rename (atomic on POSIX).
        fs.pipe_file(f"{root}/{MANIFEST_NAME}.tmp", payload)
        fs.mv(f"{root}/{MANIFEST_NAME}.tmp", f"{root}/{MANIFEST_NAME}")
    else:
        fs.pipe_file(f"{root}/{MANIFEST_NAME}", payload)  # a single PUT is atomic
    return manifest


def read_manifest(storage: Storage, url: str) -> dict[str, Any] | None:
    """The manifest at ``url``, or None when the output is absent or incomplete."""
    fs, root = storage.fsspec(url)
    path = f"{root}/{MANIFEST_NAME}"
    if not fs.exists(path):
        return None
    try:
        return json.loads(fs.cat_file(path))
    except ValueError:
        return None  # unreadable: as good as absent


def verify(storage: Storage, url: str, stage: str | None = None) -> dict[str, Any]:
    """The manifest of a complete output, or IncompleteOutputError saying what is wrong and what to do."""
    manifest = read_manifest(storage, url)
    if manifest is None:
        hint = f" (re-run stage={stage} to complete it)" if stage else ""
        raise IncompleteOutputError(f"{url} is incomplete: it has no {MANIFEST_NAME}{hint}")
    if stage is not None and manifest.get("stage") != stage:
        raise IncompleteOutputError(f"{url} holds the output of stage {manifest.get('stage')!r}, not {stage!r}")
    present = list_files(storage, url)
    missing = sorted(f for f in manifest["files"] if f not in present)
    resized = sorted(f for f, size in manifest["files"].items() if f in present and present[f] != size)
    if missing or resized:
        raise IncompleteOutputError(
            f"{url} does not match its {MANIFEST_NAME}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"size changed {resized[:5]}{'...' if len(resized) > 5 else ''}"
        )
    return manifest


def data_files(manifest: Mapping[str, Any], url: str, part: str = "data") -> list[str]:
    """URLs of the files of one part (``facts.layout[part]``: the data shards by default) a complete output at
    ``url`` lists, in name order; none when the output has no such part."""
    prefix = manifest["facts"]["layout"].get(part)
    if prefix is None:
        return []
    return [f"{url}/{name}" for name in sorted(manifest["files"]) if name.startswith(prefix)]


def data_row_groups(manifest: Mapping[str, Any], url: str, part: str = "data") -> tuple[list[str], list[list[int]]]:
    """``data_files`` and the rows of each one's row groups, as the manifest lists them."""
    files = data_files(manifest, url, part)
    listed = manifest.get("row_groups", {})
    missing = [f for f in files if f[len(url) + 1 :] not in listed]
    if missing:
        raise IncompleteOutputError(
            f"{url}: its {MANIFEST_NAME} lists no row groups for {missing[:3]}; re-run stage={manifest['stage']}"
        )
    return files, [listed[f[len(url) + 1 :]] for f in files]


def clear(storage: Storage, url: str) -> None:
    """Remove a (partial) output so that a stage can write it afresh."""
    fs, root = storage.fsspec(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def claim_output(
    storage: Storage, url: str, *, stage: str, fingerprint: str, overwrite: bool = False, resume: bool = False
):
    """Decide what a stage does with its output location before writing to it.

    Returns the existing manifest when the same config already completed there (nothing to do). A partial
    output of a stage (a claim, no manifest) is kept when ``resume`` and it was claimed by the same stage and
    config, so the stage can finish it; otherwise it is removed and written afresh. Refuses to
    replace a complete output of another config unless ``overwrite``, and never deletes files that no stage of
    this pipeline wrote (a folder of real downloads given as an output location by mistake).
    """
    manifest = read_manifest(storage, url)
    if manifest is not None and manifest.get("fingerprint") == fingerprint and manifest.get("stage") == stage:
        try:
            return verify(storage, url, stage)
        except IncompleteOutputError:
            pass  # damaged after the fact: rebuild it
    elif manifest is not None and not overwrite:
        raise FileExistsError(
            f"{url} already holds a complete {manifest.get('stage')} output of another config "
            f"(fingerprint {str(manifest.get('fingerprint'))[:12]}, this run {fingerprint[:12]}); "
            "point this stage at another location or re-run with overwrite=true"
        )
    fs, root = storage.fsspec(url)
    if manifest is None and list_files(storage, url) and not fs.exists(f"{root}/{CLAIM_NAME}"):
        raise FileExistsError(
            f"{url} holds files that no stage of this pipeline wrote (no {MANIFEST_NAME}, no {CLAIM_NAME}); "
            "refusing to delete them: point this stage at another location"
        )
    if manifest is None and resume and _claimed_by(storage, url) == (stage, fingerprint):
        return None
    clear(storage, url)
    fs.makedirs(root, exist_ok=True)
    marker = {
        "stage": stage,
        "fingerprint": fingerprint,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    fs.pipe_file(f"{root}/{CLAIM_NAME}", json.dumps(marker).encode())
    return None


def _claimed_by(storage: Storage, url: str) -> tuple[str, str] | None:
    fs, root = storage.fsspec(url)
    try:
        claim = json.loads(fs.cat_file(f"{root}/{CLAIM_NAME}"))
        return claim["stage"], claim["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
