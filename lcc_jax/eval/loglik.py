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

Batching: requests are sorted longest first and cut with `make_batches` into fixed-size batches
padded to a short list of lengths (`length_buckets`), so the model compiles once per bucket. Only the
last `scored` positions of each row (a power of two covering the longest continuation) reach the
lm_head, in blocks; only (batch,) sums and flags leave the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lcc_jax.data.batching import Batch, make_batches, prefetch
from lcc_jax.eval.perplexity import _batch_size, _quiet_length_warning, logits_block
from lcc_jax.eval.tasks import ZeroShotError
from lcc_jax.progress import bar
from lcc_jax.sharding import batch_sharding

log = logging.getLogger(__name__)

TokenPair = tuple[list[int], list[int]]  # (context ids, continuation ids)
_ENCODE_CHUNK = 1024  # strings per tokenizer call


@dataclasses.dataclass(frozen=True)
class LoglikResult:
    """Per-request continuation log-likelihoods, in request order, and what they took."""

    loglik: np.ndarray  # (requests,) float64: summed log p(continuation tokens | context)
    is_greedy: np.ndarray  # (requests,) bool: every continuation token was the argmax
    seconds: float  # forward passes, the first batch of each shape excluded
    compile_seconds: float  # first batch of each shape: its compilation (none if cached) and its run
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
    """Padded lengths: multiples of `multiple`, each about `growth` x the last, the top one covering `longest`.

    16, 32, 48, 64, 80, 112, 144, 192, 240, 304, 384, 480, 608, 768, 960, 1200, 1504, 1888, 2048: at
    most ~25 % padding per row and 19 shapes up to 2,048 tokens (multiples of 64 alone would be 32 and
    pad the typical 30-70-token request up to 2x; on the 7-task suite this scheme pads 1.17x, 14 shapes).
    """
    top = -(-max(longest, 1) // multiple) * multiple
    out = [multiple]
    while out[-1] < top:
        grown = -(-int(out[-1] * growth) // multiple) * multiple
        out.append(min(max(out[-1] + multiple, grown), top))
    return tuple(out)


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
) -> LoglikResult:
    """Summed log-likelihood of each continuation given its context (module docstring), in input order.

    `batch_size` is rounded up to a multiple of the mesh's batch shards; `model_kwargs` (arrays, e.g.
    `compensation=`) go to every forward call.
    """
    if not pairs:
        raise ZeroShotError("no requests to score.")
    if max_length < 1:
        raise ZeroShotError(f"max_length must be positive, not {max_length}.")
    inputs, targets, cont_lens = [], [], []
    for i, (ctx, cont) in enumerate(pairs):
        if not len(ctx) or not len(cont):
            raise ZeroShotError(f"request {i} has an empty context or continuation.")
        if len(cont) > max_length:
            raise ZeroShotError(f"request {i}'s continuation has {len(cont)} tokens, more than max_length={max_length}.")
        full = np.asarray([*ctx, *cont], np.int32)[-(max_length + 1) :]
        inputs.append(full[:-1])
        targets.append(full[1:])
        cont_lens.append(len(cont))
    batch_size = _batch_size(batch_size, mesh)
    buckets = length_buckets(max(len(x) for x in inputs))
    batches = make_batches(inputs, batch_size, pad_id=pad_id, buckets=buckets, order="length")
    scored = 1 << (max(cont_lens) - 1).bit_length()  # positions per row given to the lm_head

    graphdef, state = nnx.split(model)
    fn = _jitted_scores(graphdef)
    kwargs = dict(model_kwargs or {})
    sharding = batch_sharding(mesh) if mesh is not None else None
    arrays = (_score_arrays(b, inputs, targets, cont_lens, scored) for b in batches)

    loglik = np.zeros(len(pairs), np.float64)
    greedy = np.zeros(len(pairs), bool)
    shapes: list[tuple[int, int]] = []
    first_seconds = 0.0  # first call of each shape: compilation (cached across calls) plus that batch
    started = time.perf_counter()
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext(), \
            bar(total=len(pairs), desc=desc, unit="req") as progress:
        pending = None  # fetch batch i-1 while batch i runs

        def collect(entry):
            batch, (ll, ok) = entry
            real = batch.index >= 0
            loglik[batch.index[real]] = np.asarray(ll)[real]
            greedy[batch.index[real]] = np.asarray(ok)[real]
            progress.update(int(real.sum()))

        for batch, device_arrays in zip(batches, prefetch(arrays, size=2, sharding=sharding)):
            if batch.shape in shapes:
                out = fn(state, device_arrays, kwargs)
            else:
                t0 = time.perf_counter()
                out = jax.block_until_ready(fn(state, device_arrays, kwargs))
                first_seconds += time.perf_counter() - t0
                shapes.append(batch.shape)
                log.info("first batch of %d x %d tokens (compiling if new) in %.1f s", *batch.shape,
                         time.perf_counter() - t0)
            if pending is not None:
                collect(pending)
            pending = (batch, out)
        collect(pending)
    seconds = time.perf_counter() - started - first_seconds
    return LoglikResult(
        loglik=loglik,
        is_greedy=greedy,
        seconds=seconds,
        compile_seconds=first_seconds,
        shapes=tuple(shapes),
        tokens=int(sum(len(x) for x in inputs)),
        padded_tokens=int(sum(b.tokens.size for b in batches)),
    )


def _score_arrays(
    batch: Batch, inputs: list[np.ndarray], targets: list[np.ndarray], cont_lens: list[int], scored: int
) -> dict[str, np.ndarray]:
    """Host arrays of one batch: tokens and mask (batch, seq); positions, targets, weights (batch, k)."""
    rows, seq = batch.shape
    k = min(scored, seq)
    positions = np.zeros((rows, k), np.int32)  # the last k input positions of each row
    target = np.zeros((rows, k), np.int32)  # the token each of them predicts
    weight = np.zeros((rows, k), np.float32)  # 1 where that token belongs to the continuation
    for r, i in enumerate(batch.index):
        if i < 0:
            continue  # filler row: weight 0
        n, c = len(inputs[i]), cont_lens[i]
        pos = np.arange(n - k, n)
        valid = pos >= n - c
        pos = np.maximum(pos, 0)
        positions[r], target[r], weight[r] = pos, targets[i][pos], valid
    return dict(tokens=batch.tokens, attention_mask=batch.attention_mask, positions=positions, targets=target,
                weights=weight)


def continuation_scores(
    model: nnx.Module,
    tokens: jax.Array,  # (batch, seq) int, right-padded
    attention_mask: jax.Array,  # (batch, seq)
    positions: jax.Array,  # (batch, k) int: scored positions
    targets: jax.Array,  # (batch, k) int: the token each scored position predicts
    weights: jax.Array,  # (batch, k) float: 1 for continuation tokens
    model_kwargs: Mapping[str, Any],
) -> tuple[jax.Array, jax.Array]:
    """(batch,) fp32 summed log-likelihood of the weighted targets, and (batch,) bool all-greedy."""
    batch, k = positions.shape
    hidden = model(tokens, attention_mask, return_logits=False, **model_kwargs).hidden  # (batch, seq, embed)
    picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # (batch, k, embed)
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
    loglik = jnp.sum(jnp.where(weights > 0, logp, 0.0), axis=-1)
    return loglik, jnp.all(hit | (weights == 0), axis=-1)


@functools.lru_cache(maxsize=32)
def _jitted_scores(graphdef: nnx.GraphDef):
    def run(state, arrays, model_kwargs):
        return continuation_scores(nnx.merge(graphdef, state), model_kwargs=model_kwargs, **arrays)

    return jax.jit(run)

