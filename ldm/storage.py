"""One place that turns a location URL into a filesystem.

Every stage output and input is addressed by a URL: a local path, ``file://...`` or ``s3://bucket/key``.
Ray Data and Ray Train want a pyarrow filesystem, everything else (manifests, tar shards, small files) an
fsspec one; both come from the same :class:`Storage` so they always agree on endpoint and region.
Credentials are never part of the config: both libraries read the standard AWS environment variables.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs


@dataclass(frozen=True)
class Storage:
    """Where stage outputs live (``root``) and how to reach S3-protocol URLs."""

    root: str
    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Storage:
        return cls(root=resolve(str(cfg["root"])), endpoint_url=cfg.get("endpoint_url"), region=cfg.get("region"))

    def url(self, *parts: str) -> str:
        """A location under the storage root."""
        return "/".join([self.root, *(p.strip("/") for p in parts)])

    def is_local(self, url: str) -> bool:
        return _scheme(url) == "file"

    def pyarrow(self, url: str) -> tuple[pafs.FileSystem, str]:
        """(pyarrow filesystem, path inside it) for Ray Data / Ray Train / pyarrow.dataset."""
        if _scheme(url) == "s3":
            options: dict[str, Any] = {"region": self.region} if self.region else {}
            if self.endpoint_url:
                endpoint = urlparse(self.endpoint_url)
                options.update(endpoint_override=endpoint.netloc or endpoint.path, scheme=endpoint.scheme or "https")
            return pafs.S3FileSystem(**options), _s3_path(url)
        return pafs.LocalFileSystem(), _local_path(url)

    def fsspec(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """(fsspec filesystem, path inside it) for everything that is not Ray Data / Ray Train."""
        if _scheme(url) == "s3":
            client_kwargs = {"region_name": self.region} if self.region else {}
            # Listings are not cached: another process (a Ray task, a re-run) may have just written a file.
            fs = fsspec.filesystem(
                "s3", endpoint_url=self.endpoint_url, client_kwargs=client_kwargs, use_listings_cache=False
            )
            return fs, _s3_path(url)
        return fsspec.filesystem("file"), _local_path(url)

    def configure_fsspec(self) -> None:
        """Make this storage's S3 endpoint and region fsspec's defaults in this process, for libraries that
        open URLs with fsspec themselves (img2dataset's writers)."""
        settings = {"endpoint_url": self.endpoint_url, "use_listings_cache": False}
        if self.region:
            settings["client_kwargs"] = {"region_name": self.region}
        fsspec.config.conf["s3"] = settings

    @contextmanager
    def local_directory(self, url: str) -> Iterator[str]:
        """A local path holding the directory at ``url``: the path itself if it is local, otherwise a temporary
        copy (``from_pretrained`` and friends read files)."""
        if self.is_local(url):
            yield _local_path(url)
            return
        fs, path = self.fsspec(url)
        if not fs.exists(path):
            raise FileNotFoundError(f"{url}: no such directory")
        with tempfile.TemporaryDirectory(prefix="fetched-") as local:
            fs.get(f"{path}/", f"{local}/", recursive=True)
            yield local


def model_location(name_or_path: str) -> str:
    """A model reference as every process reads it the same: storage URLs and existing local paths made
    absolute, anything else taken for a hub id (``org/name``). A path that does not exist is an error here
    rather than a confusing hub lookup."""
    if _is_object_store(name_or_path) or name_or_path.startswith("file://") or os.path.exists(name_or_path):
        return resolve(name_or_path)
    if name_or_path.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"no model directory at {name_or_path}")
    return name_or_path


def is_hub_id(location: str) -> bool:
    """A ``model_location`` that names a hub repository rather than a directory."""
    return not (_is_object_store(location) or os.path.isabs(location))


@contextmanager
def pretrained_directory(name_or_path: str, storage: Storage | None) -> Iterator[str]:
    """What ``from_pretrained`` reads for a model reference: a hub id or a local directory as it is (one code
    path for both), an object-store directory copied to local disk first (``from_pretrained`` reads files)."""
    if not _is_object_store(name_or_path):
        yield name_or_path
        return
    if storage is None:
        raise ValueError(f"reading {name_or_path} needs the storage config (its endpoint and region)")
    with storage.local_directory(name_or_path) as local:
        yield local


def resolve(url: str) -> str:
    """A URL that means the same in every process: relative local paths become absolute.

    Ray workers run in other processes, possibly other directories; pin the driver's view of the path.
    """
    url = url.rstrip("/")
    return os.path.abspath(_local_path(url)) if _scheme(url) == "file" else url


def _is_object_store(url: str) -> bool:
    return url.startswith(("s3://", "s3a://"))


def _scheme(url: str) -> str:
    scheme = urlparse(url).scheme
    if scheme in ("", "file"):
        return "file"
    if scheme in ("s3", "s3a"):
        return "s3"
    raise ValueError(f"unsupported storage URL {url!r}: expected a local path, file://... or s3://bucket/key")


def _s3_path(url: str) -> str:
    parsed = urlparse(url)
    return f"{parsed.netloc}{parsed.path}".rstrip("/")


def _local_path(url: str) -> str:
    if not url.startswith("file://"):
        return url
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost") or not parsed.path:
        raise ValueError(f"bad local URL {url!r}: expected file:///absolute/path or a plain path")
    return parsed.path


def weights_digest(name_or_path: str, storage: Storage | None = None, subfolder: str | None = None) -> str:
    """sha256 over a model directory's config and weight files (diffusers or transformers): a model's identity,
    whatever its location (local, ``s3://``, or a hub id, resolved through the same cache ``from_pretrained``
    uses)."""
    if name_or_path.startswith(("s3://", "s3a://")):
        if storage is None:
            raise ValueError(f"reading the model at {name_or_path} needs the storage config")
        fs, root = storage.fsspec(name_or_path)
    else:
        if not os.path.isdir(name_or_path):  # a hub id
            from huggingface_hub import snapshot_download

            prefix = f"{subfolder}/" if subfolder else ""
            # What from_pretrained itself fetches: the config and the safetensors (.bin only if there are none).
            repo = name_or_path
            name_or_path = snapshot_download(repo, allow_patterns=[f"{prefix}config.json", f"{prefix}*.safetensors"])
            if not list(Path(name_or_path, prefix).glob("*.safetensors")):
                name_or_path = snapshot_download(repo, allow_patterns=[f"{prefix}config.json", f"{prefix}*.bin"])
        fs, root = fsspec.filesystem("file"), os.path.abspath(name_or_path)
    folder = f"{root}/{subfolder}" if subfolder else root
    names = sorted(
        p
        for p in fs.ls(folder, detail=False)
        if p.rsplit("/", 1)[-1] == "config.json" or p.endswith((".safetensors", ".bin"))
    )
    if any(n.endswith(".safetensors") for n in names):  # what from_pretrained loads when both are there
        names = [n for n in names if not n.endswith(".bin")]
    if not any(n.endswith("config.json") for n in names):
        raise FileNotFoundError(
            f"{name_or_path}{'/' + subfolder if subfolder else ''}: no config.json; not a model directory"
        )
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.rsplit("/", 1)[-1].encode())
        with fs.open(name, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()
