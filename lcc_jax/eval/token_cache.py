"""Tokenized zero-shot requests kept on disk, so a new process skips tokenizing the suite again.

Tokenizing the 7-task suite (65,984 requests) takes 5.7 s on an H100 host and 10 s on a 2-core CPU, in every
process that evaluates: as long as the forward passes of a small model. The pairs are stored under
`$LCC_CACHE_DIR/zeroshot_tokens/<key>.npz`, where the key hashes everything the ids depend on: the
tokenizer's full serialized form (vocabulary, merges, normalizer, pre- and post-processor: `to_str()` of a
`tokenizers` backend), the special-token switch, every (context, continuation) string, and the encoding's
version. A tokenizer with no serialized form is never cached. `LCC_TOKEN_CACHE=0` turns the cache off; an
unreadable entry is logged and tokenized again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lcc_jax.convert.builtin import cache_dir
from lcc_jax.eval import collector

log = logging.getLogger(__name__)

ENV = "LCC_TOKEN_CACHE"
VERSION = 1  # bump when encode_requests changes what ids it gives for the same strings
TokenPair = tuple[list[int], list[int]]


def enabled() -> bool:
    """False when LCC_TOKEN_CACHE is 0 / false / no / off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def folder() -> Path:
    return cache_dir() / "zeroshot_tokens"


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """sha256 of the tokenizer's serialized form, or None when it has none (then nothing is cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    to_str = getattr(backend, "to_str", None)
    if to_str is None:
        return None
    try:
        text = to_str()
    except Exception:  # noqa: BLE001 - a backend that cannot serialize is just not cached
        return None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def request_key(tokenizer: Any, requests: Sequence[tuple[str, str]], add_special_tokens: bool | None) -> str | None:
    """The cache key of these requests under this tokenizer, or None when the tokenizer cannot be fingerprinted."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        return None
    digest = hashlib.sha256(f"v{VERSION}|{fingerprint}|{add_special_tokens!r}|{len(requests)}".encode())
    for context, continuation in requests:
        digest.update(context.encode("utf-8", "surrogatepass") + b"\x00")
        digest.update(continuation.encode("utf-8", "surrogatepass") + b"\x01")
    return digest.hexdigest()


def cached_pairs(tokenizer: Any, requests: Sequence[tuple[str, str]], add_special_tokens: bool | None,
                 encode: Callable[[], list[TokenPair]]) -> list[TokenPair]:
    """`encode()`'s token pairs for `requests`, read from the disk cache when an entry exists, else encoded and
    written there (atomically) for the next process."""
    key = request_key(tokenizer, requests, add_special_tokens) if enabled() and requests else None
    if key is None:
        return encode()
    path = folder() / f"{key}.npz"
    if path.exists():
        try:
            pairs = _read(path)
            if len(pairs) == len(requests):
                log.info("zero-shot requests' tokens read from %s", path)
                return pairs
            log.warning("%s holds %d pairs for %d requests; tokenizing again", path, len(pairs), len(requests))
        except (OSError, ValueError, KeyError) as err:
            log.warning("could not read %s (%s); tokenizing again", path, err)
    pairs = encode()
    try:
        _write(path, pairs)
    except OSError as err:
        log.warning("could not write the token cache %s (%s); continuing without it", path, err)
    return pairs


def _write(path: Path, pairs: Sequence[TokenPair]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, part in (("context", [c for c, _ in pairs]), ("continuation", [x for _, x in pairs])):
        arrays[f"{name}_ids"] = np.fromiter((t for ids in part for t in ids), np.int32)
        arrays[f"{name}_ends"] = np.cumsum([len(ids) for ids in part], dtype=np.int64)
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read(path: Path) -> list[TokenPair]:
    with collector.paused():  # 0.30-0.39 s instead of 0.81-1.01 s for the suite (2-core CPU, fresh process)
        with np.load(path) as data:
            parts = [_split(data[f"{name}_ids"], data[f"{name}_ends"]) for name in ("context", "continuation")]
        if len(parts[0]) != len(parts[1]):
            raise ValueError("context and continuation counts differ")
        return list(zip(*parts))


def _split(ids: np.ndarray, ends: np.ndarray) -> list[list[int]]:
    """The rows of a flat id array cut at `ends` (one tolist() and list slices)."""
    if len(ends) and int(ends[-1]) != len(ids):
        raise ValueError("offsets do not match the ids")
    flat, bounds = ids.tolist(), [0, *ends.tolist()]
    return [flat[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
