"""What makes a row unfit for training, decided column-wise on Arrow batches.

Every dropped row gets exactly one reason, the first rule it fails, with the rules taken in three rounds:
the metadata rules (``status`` to ``aspect_ratio`` on the declared size, in ``REASONS`` order); then, among
the rows that pass them, the duplicates (the first row in input order is kept) and the token bounds; then
decoding, and the size rules again on the decoded size. Cheap rules run first, so a row is never charged to an
expensive check that a cheap one already rules out. A duplicate's first row can still fall in a later round
(undecodable, too many tokens), and then both are gone: deduplication must be decided before anything is
decoded to stay a cheap metadata pass.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

REASONS = (
    "status",  # img2dataset did not download it
    "caption_length",  # characters outside bounds (null and blank captions have 0)
    "caption_denylist",  # the caption matches a deny pattern
    "nsfw",  # NSFW tag not allowed (a null tag is not allowed either)
    "similarity",  # CLIP image-text similarity below the threshold, or unknown
    "image_size",  # declared (metadata) or decoded width/height below the minimum
    "aspect_ratio",  # declared or decoded long side / short side above the maximum
    "duplicate_key",  # an earlier kept row has the same sample key (two downloads merged): keys must be unique
    "duplicate_url",  # an earlier kept row has the same URL
    "duplicate_image",  # an earlier kept row has the same image bytes (sha256)
    "caption_tokens",  # tokens outside bounds
    "undecodable",  # the bytes are not a complete image (header or stream broken), or missing
)


@dataclass(frozen=True)
class Filters:
    """``stage.filters``: None switches a rule off."""

    status: str | None = "success"
    min_similarity: float | None = None
    nsfw_allowed: tuple[str, ...] | None = None
    min_width: int | None = None
    min_height: int | None = None
    max_aspect_ratio: float | None = None
    caption_min_chars: int | None = None
    caption_max_chars: int | None = None
    caption_min_tokens: int | None = None
    caption_max_tokens: int | None = None
    caption_denylist: tuple[str, ...] = ()
    dedup_urls: bool = True
    dedup_images: bool = True
    verify_image_stream: bool = True  # decode JPEGs in full (at 1/8 scale), not just the header

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Filters:
        cfg = dict(cfg)
        for name in ("nsfw_allowed", "caption_denylist"):
            if cfg.get(name) is not None:
                cfg[name] = tuple(cfg[name])
        try:
            filters = cls(**cfg)
        except TypeError as error:
            raise ValueError(f"stage.filters: {error}") from None
        for pattern in filters.caption_denylist:
            try:  # fail here, naming the pattern, not in a worker halfway through the data
                pc.match_substring_regex(pa.array([""]), pattern)
            except pa.ArrowInvalid as error:
                raise ValueError(f"stage.filters.caption_denylist: {pattern!r} is not an RE2 regex: {error}") from None
        return filters

    @property
    def counts_tokens(self) -> bool:
        return self.caption_min_tokens is not None or self.caption_max_tokens is not None


def normalise_captions(captions: pa.Array) -> pa.Array:
    """Whitespace trimmed and collapsed to single spaces; nulls stay null; bytes that are not UTF-8 (parquet
    does not check) replaced by U+FFFD rather than failing the job."""
    captions = pc.cast(captions, pa.string())
    try:
        captions.validate(full=True)
    except pa.ArrowInvalid:
        raw = pc.cast(captions, pa.binary()).to_pylist()
        captions = pa.array([None if b is None else b.decode("utf-8", "replace") for b in raw], pa.string())
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(captions, r"\s+", " "))


def metadata_reasons(roles: Mapping[str, pa.Array], filters: Filters, num_rows: int) -> np.ndarray:
    """The first metadata rule each row fails (None: passes), from the columns by role (see ``Columns``):
    ``caption`` already normalised; roles the data lacks are absent and their rules skipped."""
    reasons = np.full(num_rows, None, dtype=object)
    caption = roles["caption"]
    chars = pc.fill_null(pc.utf8_length(caption), 0).to_numpy(zero_copy_only=False)
    rules: list[tuple[str, Any]] = []
    if "status" in roles and filters.status is not None:
        rules.append(("status", _is_not(roles["status"], [filters.status])))
    rules.append(("caption_length", _outside(chars, filters.caption_min_chars, filters.caption_max_chars)))
    if filters.caption_denylist:
        pattern = "|".join(f"(?:{p})" for p in filters.caption_denylist)
        denied = pc.match_substring_regex(caption, pattern, ignore_case=True)
        rules.append(("caption_denylist", pc.fill_null(denied, False).to_numpy(zero_copy_only=False)))
    if "nsfw" in roles and filters.nsfw_allowed is not None:
        rules.append(("nsfw", _is_not(roles["nsfw"], list(filters.nsfw_allowed))))
    if "similarity" in roles and filters.min_similarity is not None:
        below = pc.fill_null(pc.less(pc.cast(roles["similarity"], pa.float64()), filters.min_similarity), True)
        rules.append(("similarity", below.to_numpy(zero_copy_only=False)))
    for rule in rules:
        _charge(reasons, *rule)
    if "width" in roles and "height" in roles:
        _charge_sizes(reasons, _floats(roles["width"]), _floats(roles["height"]), filters)
    return reasons


def size_reasons(width: np.ndarray, height: np.ndarray, filters: Filters) -> np.ndarray:
    """``image_size`` / ``aspect_ratio`` for decoded sizes (NaN: unknown, passes)."""
    reasons = np.full(len(width), None, dtype=object)
    _charge_sizes(reasons, width, height, filters)
    return reasons


def probe_image(data: bytes | None, full: bool = True) -> tuple[int, int] | None:
    """(width, height) of an image, or None when the bytes are not one.

    The header gives the size. With ``full``, the image is decoded too, cheaply: a JPEG (nearly all of LAION)
    at 1/8 scale, which still walks the whole entropy-coded stream, so a file cut off mid-download fails here
    rather than in the middle of training. Any failure of the decoder on hostile bytes means "undecodable":
    never an exception out of the job.
    """
    if data is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                size = image.size
                if full:
                    if image.format == "JPEG":
                        image.draft(image.mode, (1, 1))
                    image.load()
        return size
    except Exception:
        return None


def url_keys(urls: pa.Array) -> pa.Array:
    """16-byte digests of the URLs (or sample keys; null stays null): a compact key to shuffle for
    deduplication."""
    raw = pc.cast(urls, pa.binary()).to_pylist()  # bytes as stored: no UTF-8 decoding to fail on
    return pa.array([None if u is None else hashlib.blake2b(u, digest_size=16).digest() for u in raw], pa.binary(16))


def image_keys(sha256_hex: pa.Array) -> pa.Array:
    """The first 16 bytes of each sha256 (null, or not a sha256, gives null: no key, never deduplicated)."""
    keys = []
    for value in sha256_hex.to_pylist():
        try:
            keys.append(bytes.fromhex(value)[:16] if value and len(value) == 64 else None)
        except ValueError:
            keys.append(None)
    return pa.array(keys, pa.binary(16))


def sha256_hex(images: list[bytes | None]) -> pa.Array:
    return pa.array([None if b is None else hashlib.sha256(b).hexdigest() for b in images], pa.string())


def dedup_keys(keys: pa.Table, rules: Mapping[str, str]) -> pa.Table:
    """One (unit, row, key, reason) row per deduplication key a row has: ``rules`` maps a key column to the
    reason it gives (``{"url_key": "duplicate_url"}``). Keys are prefixed by their rule, so a single shuffle
    on ``key`` serves every rule."""
    parts = []
    for number, (column, reason) in enumerate(rules.items()):
        part = keys.filter(pc.is_valid(keys[column]))  # no key (no URL, no hash): never a duplicate
        prefixed = pc.binary_join_element_wise(bytes([number]), pc.cast(part[column], pa.binary()), b"")
        parts.append(
            pa.table(
                {
                    "unit": part["unit"],
                    "row": part["row"],
                    "key": prefixed,
                    "reason": pa.array([reason] * len(part), pa.string()),
                }
            )
        )
    return pa.concat_tables(parts)


def later_duplicates(keys: pa.Table, key: str = "key") -> pa.Table:
    """The rows of ``keys`` (with ``unit``, ``row`` and ``key`` columns) whose key an earlier row (by unit, then
    row) has. ``keys`` must hold every row of each key value it holds: a hash partition of the key."""
    order = pc.add(pc.multiply(pc.cast(keys["unit"], pa.int64()), 1 << 32), pc.cast(keys["row"], pa.int64()))
    keys = keys.append_column("_order", order)
    first = keys.group_by(key).aggregate([("_order", "min")]).rename_columns([key, "_first"])
    joined = keys.join(first, key)
    later = joined.filter(pc.not_equal(joined["_order"], joined["_first"]))
    return later.drop_columns(["_order", "_first"])


def _charge(reasons: np.ndarray, reason: str, failed: np.ndarray) -> None:
    reasons[np.asarray(failed, dtype=bool) & (reasons == None)] = reason  # noqa: E711 (elementwise)


def _charge_sizes(reasons: np.ndarray, width: np.ndarray, height: np.ndarray, filters: Filters) -> None:
    with np.errstate(invalid="ignore", divide="ignore"):
        small = np.zeros(len(width), dtype=bool)
        if filters.min_width is not None:
            small |= width < filters.min_width
        if filters.min_height is not None:
            small |= height < filters.min_height
        _charge(reasons, "image_size", small)
        if filters.max_aspect_ratio is not None:
            ratio = np.maximum(width, height) / np.minimum(width, height)
            _charge(reasons, "aspect_ratio", ratio > filters.max_aspect_ratio)  # NaN (unknown) compares False


def _outside(values: np.ndarray, low: int | None, high: int | None) -> np.ndarray:
    out = np.zeros(len(values), dtype=bool)
    if low is not None:
        out |= values < low
    if high is not None:
        out |= values > high
    return out


def _is_not(values: pa.Array, allowed: list[str]) -> np.ndarray:
    return pc.invert(
        pc.fill_null(pc.is_in(pc.cast(values, pa.string()), pa.array(allowed, pa.string())), False)
    ).to_numpy(zero_copy_only=False)


def _floats(values: pa.Array) -> np.ndarray:
    """Sizes as floats, unknown (null, zero or negative) as NaN so that no size rule fires on them."""
    sizes = pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)
    sizes = np.where(np.isnan(sizes) | (sizes <= 0), np.nan, sizes)
    return sizes
