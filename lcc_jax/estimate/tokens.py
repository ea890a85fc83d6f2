"""Tokens per stage, padded as each stage batches them (shapes as (rows, length))."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from lcc_jax.data.runner import padded_shapes
from lcc_jax.data.text import data_dir
from lcc_jax.estimate.costs import CHARS_PER_TOKEN, WIKITEXT2_TEST_CHARS
from lcc_jax.eval.score_rows import packed_shapes
from lcc_jax.eval.tasks import load_docs, resolve_tasks
from lcc_jax.restore.capture import capture_buckets

log = logging.getLogger("lcc_jax.estimate")  # one logger for the package


def text_tokens(text: str) -> int:
    """Tokens of a text, from its characters (+1 for a BOS)."""
    return 1 + math.ceil(len(text) / CHARS_PER_TOKEN)


def capture_shapes(lengths: Sequence[int], batch: int) -> list[tuple[int, int]]:
    return padded_shapes(lengths, batch, capture_buckets(lengths, batch))


def packed_train_shapes(lengths: Sequence[int], batch: int, epochs: int, multiple: int = 128) -> list[tuple[int, int]]:
    """One packed row per micro-batch (`pack_batch`): its samples' tokens, rounded up to `multiple`."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(epochs):
        order = rng.permutation(len(lengths))
        for start in range(0, len(order), batch):
            total = int(sum(lengths[i] for i in order[start : start + batch]))
            out.append((1, -(-total // multiple) * multiple))
    return out


def wikitext2_tokens() -> int:
    """Tokens of the WikiText-2 test text (from the local file's size when present)."""
    root = data_dir()
    path = root / "wikitext-2-raw" / "wiki.test.raw" if root is not None else None
    chars = path.stat().st_size if path is not None and path.is_file() else WIKITEXT2_TEST_CHARS
    return int(chars / CHARS_PER_TOKEN)


def perplexity_shapes(seqlen: int, limit_chunks: int | None, batch: int = 1) -> list[tuple[int, int]]:
    chunks = wikitext2_tokens() // seqlen
    chunks = min(chunks, limit_chunks) if limit_chunks else chunks
    return [(batch, seqlen)] * math.ceil(chunks / batch)


def zeroshot_shapes(tasks: str | None, limit: int | None, batch: int = 16,
                    max_length: int = 2048) -> list[tuple[int, int]] | None:
    """Padded shapes of the zero-shot rows, or None when the documents cannot be read.

    As `eval.loglik` scores them: a document whose choices share one context is one row (the context once,
    each continuation after it), any other request a row of its own; the rows packed several to a line
    (`eval.score_rows.packed_shapes`; the line length priced without the model's attention cost).
    """
    if not tasks:
        return []
    quiet = logging.getLogger("lcc_jax.eval.tasks")
    level, quiet.level = quiet.level, logging.WARNING
    try:
        lengths = [n for name in resolve_tasks(tasks) for doc in load_docs(name, limit=limit)
                   for n in _row_tokens(doc.requests, max_length)]
    except Exception as e:  # noqa: BLE001 - no local file and no hub: the estimate leaves zero-shot out
        log.debug("zero-shot not estimated: %s", e)
        return None
    finally:
        quiet.level = level
    return packed_shapes(lengths, batch) if lengths else []


def _row_tokens(requests: Sequence[tuple[str, str]], max_length: int) -> list[int]:
    """Estimated tokens of the rows that score one document's requests."""
    sizes = [(text_tokens(ctx), text_tokens(cont) - 1) for ctx, cont in requests]  # no BOS on a continuation
    if len({ctx for ctx, _ in requests}) == 1 and all(c + x <= max_length for c, x in sizes):
        return [sizes[0][0] + sum(max(x - 1, 0) for _, x in sizes)]
    return [min(max_length, c + x) for c, x in sizes]
