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
padded to a short list of lengths (the ladder `lcc_jax.data.runner.choose_buckets` picks for the
device: fine on a CPU, coarse where compiles cost more than padding), and run by the shared `Runner`,
so the model compiles once per bucket, ahead of time. Only the last `scored` positions of each row (a
power of two covering the longest continuation) reach the lm_head, in blocks; only (batch,) sums and
flags leave the device.
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
from lcc_jax.data.runner import Runner, batch_rows, choose_buckets, ladder
from lcc_jax.eval.perplexity import _quiet_length_warning, logits_block
from lcc_jax.eval.tasks import ZeroShotError

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
    batch_size = batch_rows(batch_size, mesh, ZeroShotError)
    buckets = choose_buckets([len(x) for x in inputs], batch_size)
    batches = make_batches(inputs, batch_size, pad_id=pad_id, buckets=buckets, order="length")
    scored = 1 << (max(cont_lens) - 1).bit_length()  # positions per row given to the lm_head

    loglik = np.zeros(len(pairs), np.float64)
    greedy = np.zeros(len(pairs), bool)

    def collect(index: np.ndarray, out: tuple[np.ndarray, np.ndarray]) -> int:
        ll, ok = out
        real = index >= 0
        loglik[index[real]] = ll[real]
        greedy[index[real]] = ok[real]
        return int(real.sum())

    runner = Runner(model, _score_step, mesh=mesh, model_kwargs=model_kwargs)
    work = [(b.index, _score_arrays(b, inputs, targets, cont_lens, scored)) for b in batches]
    stats = runner.run(work, collect, desc=desc, total=len(pairs), unit="req")
    return LoglikResult(
        loglik=loglik,
        is_greedy=greedy,
        seconds=stats.seconds,
        compile_seconds=stats.compile_seconds,
        shapes=stats.shapes,
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


def _score_step(model: nnx.Module, arrays: Mapping[str, jax.Array], model_kwargs: Mapping[str, Any]):
    """The runner's step: `continuation_scores` of one batch."""
    return continuation_scores(model, model_kwargs=model_kwargs, **arrays)
