"""Batched log-likelihood of continuations given contexts, as lm-eval's Hugging Face model computes it.

Tokenization (lm-eval `HFLM._encode_pair`): trailing whitespace of the context moves onto the
continuation; whole = tok(context + continuation), context = tok(context), continuation =
whole[len(context):]. Both use the tokenizer's default special tokens (a BOS where the tokenizer adds
one; `add_special_tokens=False` gives lm-eval 0.4's causal-LM default, no BOS). An empty context
becomes the EOS token, as in lm-eval.

Scoring (lm-eval `_loglikelihood_tokens`): the model reads (context + continuation)[-(max_length+1):][:-1],
so long contexts lose tokens on the left, and the continuation's tokens are the targets of its last
len(continuation) positions. Their fp32 log-softmax values are summed; `is_greedy` says whether every
continuation token is the argmax.

Shared contexts: a document's choices usually share one context (all but WinoGrande in the suite), so
consecutive requests with the same context ids are one row: the context once, then each continuation as
a branch that sees the context and itself (`AttentionMask.branches`, positions restarting after the
context). The log-likelihoods are those of one row per request, from half the tokens on the pruning
suite (SmolLM2's tokens: 4.72 M -> 2.39 M). Requests cut on the left, and sliding-window models, keep a
row each (`share_contexts=False` gives that everywhere).

Packing (`lcc_jax.eval.score_rows`, which also builds the rows): with shared contexts, rows up to
`pack_length` tokens (256, 384 or 512, whichever costs least in padded tokens, attention over the line and
compiled shapes) are packed best-fit into lines of that length,
each row a segment of its own (`AttentionMask` segment ids, its positions kept), so one compiled length
carries nearly every row with almost no padding: SmolLM2's suite at 64 lines a batch, priced for a GPU, pads
to 2.44 M tokens in 2 shapes (384-token lines) where one row a line padded to 3.28 M in 7. `pack=False`
keeps one row a line.

Batching: rows are sorted longest first and cut with `make_batches` into fixed-size batches padded to a
short list of lengths (the packed length, then for longer rows the ladder `lcc_jax.data.runner.choose_buckets`
picks for the device: fine on a CPU, coarse where compiles cost more than padding), and run by the shared
`Runner`, so the model compiles once per bucket, ahead of time. Only the scored positions of each row (a
power of two per length covering its rows' continuation tokens) reach the lm_head, in blocks; only (batch,
requests per row) sums and flags leave the device.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lcc_jax.data.batching import Batch, make_batches
from lcc_jax.data.runner import Runner, batch_rows, ladder
from lcc_jax.eval.perplexity import _quiet_length_warning, logits_block
from lcc_jax.eval.score_rows import (  # noqa: F401 - MAX_BRANCHES and packed_shapes are this module's API too
    MAX_BRANCHES,
    ScoreRow,
    attention_length_of,
    buckets_for,
    pack_length,
    pack_rows,
    packed_shapes,
    score_rows,
)
from lcc_jax.eval.tasks import ZeroShotError
from lcc_jax.models.attention import AttentionMask

log = logging.getLogger(__name__)

TokenPair = tuple[list[int], list[int]]  # (context ids, continuation ids)
_ENCODE_CHUNK = 1024  # strings per tokenizer call


@dataclasses.dataclass(frozen=True)
class LoglikResult:
    """Per-request continuation log-likelihoods, in request order, and what they took."""

    loglik: np.ndarray  # (requests,) float64: summed log p(continuation tokens | context)
    is_greedy: np.ndarray  # (requests,) bool: every continuation token was the argmax
    seconds: float  # forward passes, compilation excluded
    compile_seconds: float  # compiling the shapes not compiled yet (0 when all were cached)
    shapes: tuple[tuple[int, int], ...]  # (batch, seq) of each bucket used
    tokens: int  # real input tokens
    padded_tokens: int  # input tokens with padding and filler rows


# ---------------------------------------------------------------------------------- tokenization


def encode_requests(
    tokenizer: Any, requests: Sequence[tuple[str, str]], *, add_special_tokens: bool | None = None
) -> list[TokenPair]:
    """(context ids, continuation ids) of each (context, continuation), by lm-eval's `_encode_pair`.

    `tokenizer` is a Hugging Face tokenizer (anything whose call on a list of strings returns
    {"input_ids": list of id lists}). `add_special_tokens=None` keeps the tokenizer's default.
    """
    moved = [_move_trailing_space(c, x) for c, x in requests]
    contexts = sorted({c for c, _ in moved if c})
    context_ids = dict(zip(contexts, _encode(tokenizer, contexts, add_special_tokens)))
    wholes = [c + x for c, x in moved if c]
    whole_ids = iter(_encode(tokenizer, wholes, add_special_tokens))
    bare = [x for c, x in moved if not c]
    bare_ids = iter(_encode(tokenizer, bare, add_special_tokens))
    pairs = []
    for i, (context, continuation) in enumerate(moved):
        if context:
            ctx = context_ids[context]
            cont = next(whole_ids)[len(ctx) :]
        else:  # lm-eval: end-of-text as the context
            eos = getattr(tokenizer, "eos_token_id", None)
            if eos is None:
                raise ZeroShotError(f"request {i} has an empty context and the tokenizer has no eos_token_id.")
            ctx, cont = [int(eos)], next(bare_ids)
        if not ctx or not cont:
            raise ZeroShotError(
                f"request {i} encodes to an empty {'context' if not ctx else 'continuation'}: "
                f"{(context, continuation)!r}."
            )
        pairs.append((ctx, cont))
    return pairs


def _move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def _encode(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool | None) -> list[list[int]]:
    kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    out: list[list[int]] = []
    with _quiet_length_warning():
        for start in range(0, len(texts), _ENCODE_CHUNK):
            chunk = list(texts[start : start + _ENCODE_CHUNK])
            ids = tokenizer(chunk, **kwargs)["input_ids"]
            if len(ids) != len(chunk):
                raise ZeroShotError(f"the tokenizer returned {len(ids)} sequences for {len(chunk)} texts.")
            out.extend([int(t) for t in row] for row in ids)
    return out


# ---------------------------------------------------------------------------------- scoring


def length_buckets(longest: int, multiple: int = 16, growth: float = 1.25) -> tuple[int, ...]:
    """Padded lengths: `lcc_jax.data.runner.ladder` (multiples of `multiple`, each about `growth` x the last).

    16, 32, 48, 64, 80, 112, 144, 192, 240, 304, 384, 480, 608, 768, 960, 1200, 1504, 1888, 2048 at
    growth 1.25: at most ~25 % padding per row and 19 shapes up to 2,048 tokens.
    """
    return ladder(longest, multiple, growth)


def loglikelihood_tokens(
    model: nnx.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    mesh: Mesh | None = None,
    max_length: int = 2048,
    model_kwargs: Mapping[str, Any] | None = None,
    pad_id: int = 0,
    desc: str = "loglikelihood",
    share_contexts: bool = True,
    pack: bool = True,
) -> LoglikResult:
    """Summed log-likelihood of each continuation given its context (module docstring), in input order.

    `batch_size` is rounded up to a multiple of the mesh's batch shards; `model_kwargs` (arrays, e.g.
    `compensation=`) go to every forward call. `share_contexts`: consecutive requests with the same context
    ids (a document's choices) are scored in one row, the context once and each continuation as a branch
    that sees the context and itself (`AttentionMask.branches`): the same log-likelihoods from half the
    tokens on the pruning suite. Requests cut on the left (longer than `max_length`), and models with a
    sliding window, get a row each as without sharing. `pack` (with sharing): rows are packed several to a
    batch line (module docstring); the log-likelihoods are the same.
    """
    if not pairs:
        raise ZeroShotError("no requests to score.")
    if max_length < 1:
        raise ZeroShotError(f"max_length must be positive, not {max_length}.")
    for i, (ctx, cont) in enumerate(pairs):
        if not len(ctx) or not len(cont):
            raise ZeroShotError(f"request {i} has an empty context or continuation.")
        if len(cont) > max_length:
            raise ZeroShotError(f"request {i}'s continuation has {len(cont)} tokens, more than max_length={max_length}.")
    share = share_contexts and getattr(model.config, "sliding_window", None) is None
    rows = score_rows(pairs, max_length, share)
    lines = batch_rows(batch_size, mesh, ZeroShotError)
    if share and pack:
        rows = pack_rows(rows, pack_length([len(r.tokens) for r in rows], lines,
                                           attention_length=attention_length_of(model.config)))
    batches, work = prepare_batches(rows, lines, pad_id, share)

    loglik = np.zeros(len(pairs), np.float64)
    greedy = np.zeros(len(pairs), bool)

    def collect(index: np.ndarray, out: tuple[np.ndarray, np.ndarray]) -> int:
        ll, ok = out  # (batch, slots) each
        done = 0
        for r, i in enumerate(index):
            if i < 0:
                continue
            requests = rows[i].requests
            loglik[list(requests)] = ll[r, : len(requests)]
            greedy[list(requests)] = ok[r, : len(requests)]
            done += len(requests)
        return done

    runner = Runner(model, _score_step, mesh=mesh, model_kwargs=model_kwargs)
    stats = runner.run(work, collect, desc=desc, total=len(pairs), unit="req")
    return LoglikResult(
        loglik=loglik,
        is_greedy=greedy,
        seconds=stats.seconds,
        compile_seconds=stats.compile_seconds,
        shapes=stats.shapes,
        tokens=int(sum(len(row.tokens) for row in rows)),
        padded_tokens=int(sum(b.tokens.size for b in batches)),
    )


def prepare_batches(rows: Sequence[ScoreRow], batch_size: int, pad_id: int, share: bool = True,
                    backend: str | None = None) -> tuple[list[Batch], list[tuple]]:
    """(padded batches, the runner's work items: (row index, score arrays) per batch) of `score_rows`' rows: what
    remains before the first forward pass. `batch_size`: rows per batch, rounded to the mesh (`batch_rows`);
    `backend`: whose length ladder to pad to (default: JAX's backend)."""
    inputs = [row.tokens for row in rows]
    packed = [len(x) for row, x in zip(rows, inputs) if row.packed]
    buckets = buckets_for(packed, [len(x) for row, x in zip(rows, inputs) if not row.packed], batch_size, backend)
    batches = make_batches(inputs, batch_size, pad_id=pad_id, buckets=buckets, order="length")
    slots = max(len(row.requests) for row in rows)  # requests per row, static
    scored = _scored_per_length(batches, rows)
    work = [(b.index, _score_arrays(b, rows, scored[b.shape[1]], slots, share)) for b in batches]
    return batches, work


def _scored_per_length(batches: Sequence[Batch], rows: Sequence[ScoreRow]) -> dict[int, int]:
    """Positions given to the lm_head per row, for each padded length: a power of two covering the rows of that
    length, but no more than the length or what they need, whichever is larger (a shared row scores its context's
    last position once per branch, so it can need more than its length). One compiled shape per length."""
    most: dict[int, int] = {}
    for b in batches:
        need = max((len(rows[i].scored) for i in b.index if i >= 0), default=1)
        most[b.shape[1]] = max(most.get(b.shape[1], 1), need)
    return {seq: min(1 << (n - 1).bit_length(), max(seq, n)) for seq, n in most.items()}


def _score_arrays(batch: Batch, rows: Sequence[ScoreRow], k: int, slots: int, share: bool = True
                  ) -> dict[str, np.ndarray]:
    """Host arrays of one batch: tokens, segments, branches (only when sharing), positions (batch, seq); scored
    positions, their targets and request slots (batch, k), slot -1 where nothing is scored."""
    size, seq = batch.shape
    segments = batch.attention_mask.copy()  # 1 real, 0 padding; a packed row's own segment ids below
    branches = np.zeros((size, seq), np.int32)
    positions = np.zeros((size, seq), np.int32)
    scored = np.zeros((size, k), np.int32)
    target = np.zeros((size, k), np.int32)
    slot = np.full((size, k), -1, np.int32)
    for r, i in enumerate(batch.index):
        if i < 0:
            continue  # filler row: nothing scored
        row = rows[i]
        n, m = len(row.tokens), len(row.scored)
        branches[r, :n], positions[r, :n] = row.branches, row.positions
        if row.segments is not None:
            segments[r, :n] = row.segments
        scored[r, :m], target[r, :m], slot[r, :m] = row.scored, row.targets, row.slot
    arrays = dict(tokens=batch.tokens, segments=segments, positions=positions, scored=scored,
                  targets=target, slot=slot, slots=np.zeros((size, slots), np.int8))
    return {**arrays, "branches": branches} if share else arrays  # no branches: any attention kernel applies


def continuation_scores(
    model: nnx.Module,
    tokens: jax.Array,  # (batch, seq) int, right-padded
    segments: jax.Array,  # (batch, seq): segment ids (1 real, or packed rows' 1, 2, ...), 0 padding
    positions: jax.Array,  # (batch, seq) RoPE positions
    scored: jax.Array,  # (batch, k) int: positions whose next-token log-probability counts
    targets: jax.Array,  # (batch, k) int: the token each of them predicts
    slot: jax.Array,  # (batch, k) int: the request (0..slots-1) each belongs to, -1 for none
    slots: jax.Array,  # (batch, slots): only its shape is read
    model_kwargs: Mapping[str, Any],
    branches: jax.Array | None = None,  # (batch, seq): 0 context, i > 0 the i-th continuation; None: no sharing
) -> tuple[jax.Array, jax.Array]:
    """(batch, slots) fp32 summed log-likelihood of each request's targets, and (batch, slots) bool all-greedy."""
    batch, k = scored.shape
    mask = AttentionMask(segments.astype(jnp.int32), None if branches is None else branches.astype(jnp.int32))
    hidden = model(tokens, mask, positions=positions, return_logits=False, **model_kwargs).hidden
    picked = jnp.take_along_axis(hidden, scored[..., None], axis=1)  # (batch, k, embed)
    block = logits_block(k, batch, model.config.vocab_size)
    blocks = -(-k // block)
    pad = blocks * block - k
    picked = jnp.pad(picked, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))

    def block_scores(args):
        h, t = args  # (batch, block, embed), (batch, block)
        logits = model.logits(h).astype(jnp.float32)  # (batch, block, vocab)
        picked_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return picked_logit - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == t

    per_block = (
        picked.reshape(batch, blocks, block, -1).swapaxes(0, 1),  # (blocks, batch, block, embed)
        targets.reshape(batch, blocks, block).swapaxes(0, 1),  # (blocks, batch, block)
    )
    logp, hit = jax.lax.map(block_scores, per_block)  # (blocks, batch, block) each
    logp = logp.swapaxes(0, 1).reshape(batch, blocks * block)[:, :k]
    hit = hit.swapaxes(0, 1).reshape(batch, blocks * block)[:, :k]
    member = slot[..., None] == jnp.arange(slots.shape[1])  # (batch, k, slots)
    loglik = jnp.sum(jnp.where(member, logp[..., None], 0.0), axis=1)
    return loglik, jnp.all(hit[..., None] | ~member, axis=1)


def _score_step(model: nnx.Module, arrays: Mapping[str, jax.Array], model_kwargs: Mapping[str, Any]):
    """The runner's step: `continuation_scores` of one batch."""
    return continuation_scores(model, model_kwargs=model_kwargs, **arrays)
