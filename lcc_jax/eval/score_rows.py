"""The rows of zero-shot scoring's forward pass: a document's context shared by its choices, rows packed several
to a batch line, and the padded lengths their batches take.

`score_rows` turns (context ids, continuation ids) pairs into `ScoreRow`s: consecutive requests with the same
context become one row, the context once and each continuation as a branch that sees the context and itself
(positions restarting after the context); a request cut on the left keeps a row of its own. `pack_rows` packs
rows best-fit into lines of `pack_length` tokens, each row a segment of its own, and `packed_shapes` gives the
batches that makes without building them (the cost estimate). `eval.loglik` batches and scores the rows.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from lcc_jax.data.runner import MULTIPLE, choose_buckets, device_costs, padded_shapes, shape_cost
from lcc_jax.eval import collector
from lcc_jax.eval.tasks import ZeroShotError

MAX_BRANCHES = 16  # requests sharing one row at most (the suite's documents have 2 to 5 choices): bounds the
# per-row outputs, and the rows' length, when many consecutive requests repeat one context


@dataclasses.dataclass(frozen=True)
class ScoreRow:
    """One row of the forward pass: a context and the continuations of the requests that share it."""

    tokens: np.ndarray  # (n,) int32: the context, then each continuation but its last token
    branches: np.ndarray  # (n,) int32: 0 = context, i = the i-th request's continuation
    positions: np.ndarray  # (n,) int32: RoPE positions, restarting at the context's end for every branch
    requests: tuple[int, ...]  # the request index of each branch
    scored: np.ndarray  # (m,) int32: the positions whose next-token log-probabilities count
    targets: np.ndarray  # (m,) int32: the token each of them predicts
    slot: np.ndarray  # (m,) int32: which of `requests` (0-based) each scored position belongs to
    segments: np.ndarray | None = None  # (n,) int32: segment ids 1, 2, ... of a packed row; None: one segment
    packed: bool = False  # made by `pack_rows` (its batch line has the packed length)


def score_rows(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int, share: bool = True
               ) -> list[ScoreRow]:
    """The rows that score `pairs`: consecutive requests with the same context share one (when `share`), else
    one row a request, cut on the left to `max_length` input tokens as lm-eval does."""
    with collector.paused():  # the suite's 20,171 rows: ~0.4 s less on a 2-core CPU
        return _score_rows(pairs, max_length, share)


def _score_rows(pairs, max_length: int, share: bool) -> list[ScoreRow]:
    rows: list[ScoreRow] = []
    group: list[int] = []

    def fits(i: int) -> bool:  # scored with no left truncation
        return len(pairs[i][0]) + len(pairs[i][1]) <= max_length + 1

    def flush() -> None:
        if group:
            rows.append(_shared_row(pairs, group))
            group.clear()

    for i, (ctx, cont) in enumerate(pairs):
        if not (share and fits(i)):
            flush()
            rows.append(_single_row(ctx, cont, i, max_length))
        elif group and (len(group) == MAX_BRANCHES or not _same_ids(pairs[group[0]][0], ctx)):
            flush()
            group.append(i)
        else:
            group.append(i)
    flush()
    return rows


PACK_LENGTHS = (256, 384, 512)  # lengths a packed line may have: XLA attention (which branches need) computes every
# query of a line against every key, so a longer line costs more per token and holds (batch, heads, line, line) scores


def pack_length(lengths: Sequence[int], batch_size: int, backend: str | None = None,
                attention_length: float | None = None) -> int:
    """The packed line's length for rows of these `lengths`, `batch_size` lines a batch: of PACK_LENGTHS (and, for
    few rows, the shortest length that fits them all in one batch) the one with the least estimated seconds, padded
    tokens and compiled shapes priced as `choose_buckets` prices them (rows longer than the line keep a line
    each, on the length ladder). `attention_length`: the line length at which attention doubles a token's cost
    (`attention_length_of(config)`; None: not priced). Ties go to the shorter line."""
    if not len(lengths):
        raise ZeroShotError("no rows to pack.")
    lengths = np.asarray(lengths, np.int64)
    shape_s, token_s = device_costs(backend)
    one_batch = -(-max(int(lengths.max()), -(-int(lengths.sum()) // batch_size)) // MULTIPLE) * MULTIPLE
    candidates = sorted({n for n in PACK_LENGTHS if n < lengths.max()} | {min(
        next((n for n in PACK_LENGTHS if n >= lengths.max()), PACK_LENGTHS[-1]), one_batch)})

    def seconds(length: int) -> float:
        lines = len(_pack_lines(lengths, length))
        per_token = token_s * (1 + (length / attention_length if attention_length else 0.0))
        total = -(-lines // batch_size) * batch_size * length * per_token + shape_s
        longer = lengths[lengths > length]
        if longer.size:
            cost = shape_cost(longer, batch_size, choose_buckets(longer, batch_size, backend=backend))
            total += cost.seconds(shape_s, token_s)
        return total

    return min(candidates, key=lambda n: (seconds(n), n))


def attention_length_of(config: Any) -> float | None:
    """The sequence length at which a decoder layer's attention over it costs as much as its weight matmuls per
    token: (q, k, v, o and a gated MLP's parameters) / (2 x heads x head_dim); None where the config lacks a size."""
    try:
        hidden, heads, kv, head_dim = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        params = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * config.intermediate_size
        return params / (2 * heads * head_dim)
    except (AttributeError, TypeError):
        return None


def pack_rows(rows: Sequence[ScoreRow], length: int) -> list[ScoreRow]:
    """Rows of at most `length` tokens packed best-fit (longest first) into rows of at most `length`, each kept as
    a segment of its own (its positions and branches unchanged, so it attends only to itself); longer rows stay
    as they are. Every request keeps its scores: slots and scored positions move with their row."""
    lengths = [len(row.tokens) for row in rows]
    alone = [i for i in sorted(range(len(rows)), key=lambda i: -lengths[i]) if lengths[i] > length]
    return [rows[i] for i in alone] + [_packed_row([rows[i] for i in line]) for line in _pack_lines(lengths, length)]


def packed_shapes(lengths: Sequence[int], batch_size: int, backend: str | None = None,
                  attention_length: float | None = None) -> list[tuple[int, int]]:
    """(batch, seq) of every batch `loglikelihood_tokens` makes from shared-context rows of these `lengths`, packed
    (what a cost estimate needs; no rows are built)."""
    if not len(lengths):
        return []
    lengths = np.asarray(lengths, np.int64)
    length = pack_length(lengths, batch_size, backend, attention_length)
    lines = [int(lengths[line].sum()) for line in _pack_lines(lengths, length)]
    longer = [int(n) for n in lengths if n > length]
    return padded_shapes(longer + lines, batch_size, buckets_for(lines, longer, batch_size, backend))


def _pack_lines(lengths: Sequence[int], length: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of the rows of at most `length` tokens in each packed line."""
    lines: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, line), sorted: the tightest line that fits comes first
    for i in sorted(range(len(lengths)), key=lambda i: -int(lengths[i])):
        n = int(lengths[i])
        if n > length:
            continue
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, line = free.pop(at)
            lines[line].append(i)
            bisect.insort(free, (space - n, line))
        else:
            bisect.insort(free, (length - n, len(lines)))
            lines.append([i])
    return lines


def _packed_row(pieces: Sequence[ScoreRow]) -> ScoreRow:
    start, requests = 0, 0
    scored, slot = [], []
    for piece in pieces:
        scored.append(piece.scored + start)
        slot.append(piece.slot + requests)
        start += len(piece.tokens)
        requests += len(piece.requests)
    return ScoreRow(
        tokens=np.concatenate([p.tokens for p in pieces]),
        branches=np.concatenate([p.branches for p in pieces]),
        positions=np.concatenate([p.positions for p in pieces]),
        requests=tuple(r for p in pieces for r in p.requests),
        scored=np.concatenate(scored),
        targets=np.concatenate([p.targets for p in pieces]),
        slot=np.concatenate(slot),
        segments=np.concatenate([np.full(len(p.tokens), k, np.int32) for k, p in enumerate(pieces, 1)]),
        packed=True,
    )


def _same_ids(a: Sequence[int], b: Sequence[int]) -> bool:
    if isinstance(a, list) and isinstance(b, list):  # the usual case (encode_requests, the token cache): no copies
        return a == b
    return len(a) == len(b) and list(a) == list(b)


def _single_row(ctx, cont, index: int, max_length: int) -> ScoreRow:
    full = np.asarray([*ctx, *cont], np.int32)[-(max_length + 1) :]
    n, c = len(full) - 1, len(cont)
    scored = np.arange(n - c, n, dtype=np.int32)
    return ScoreRow(tokens=full[:-1], branches=np.zeros(n, np.int32), positions=np.arange(n, dtype=np.int32),
                    requests=(index,), scored=scored, targets=full[1:][scored], slot=np.zeros(c, np.int32))


def _shared_row(pairs, group: Sequence[int]) -> ScoreRow:
    ctx = np.asarray(pairs[group[0]][0], np.int32)
    tokens, branches, positions = [ctx], [np.zeros(len(ctx), np.int32)], [np.arange(len(ctx), dtype=np.int32)]
    scored, targets, slot = [], [], []
    start = len(ctx)
    for b, i in enumerate(group):
        cont = np.asarray(pairs[i][1], np.int32)
        body = cont[:-1]  # the last continuation token is only a target
        tokens.append(body)
        branches.append(np.full(len(body), b + 1, np.int32))
        positions.append(np.arange(len(ctx), len(ctx) + len(body), dtype=np.int32))
        positions_scored = np.arange(start - 1, start + len(body), dtype=np.int32)
        positions_scored[0] = len(ctx) - 1  # the context's last token predicts the continuation's first
        scored.append(positions_scored)
        targets.append(cont)
        slot.append(np.full(len(cont), b, np.int32))
        start += len(body)
    return ScoreRow(tokens=np.concatenate(tokens), branches=np.concatenate(branches),
                    positions=np.concatenate(positions), requests=tuple(group), scored=np.concatenate(scored),
                    targets=np.concatenate(targets), slot=np.concatenate(slot))


def buckets_for(packed: Sequence[int], longer: Sequence[int], batch_size: int, backend: str | None
                ) -> tuple[int, ...]:
    """Padded lengths: packed lines to one length (the longest's, rounded to MULTIPLE), longer rows on the ladder."""
    if not packed:
        return choose_buckets(longer, batch_size, backend=backend)
    top = -(-max(packed) // MULTIPLE) * MULTIPLE
    return (top, *(b for b in (choose_buckets(longer, batch_size, backend=backend) if longer else ()) if b > top))
