"""Perplexity by the pruning papers' protocol (Wanda `eval_ppl_wikitext`, SparseGPT).

The text is tokenized once, with the tokenizer's default special tokens (Wanda calls
`tokenizer(text, return_tensors="pt")`), cut into non-overlapping `seqlen`-token chunks, and the
tail that does not fill a chunk is dropped. Each chunk predicts its last seqlen-1 tokens; its loss is
the mean next-token cross-entropy over them. Wanda then computes

    ppl = exp(sum_i(loss_i * seqlen) / (num_chunks * seqlen)) = exp(mean_i loss_i),

which, since every chunk has the same seqlen-1 targets, is also exp(mean NLL over all predicted
tokens). We compute exactly that (per-chunk means in fp32 on the device, their mean in fp64 on the host).

Chunks run in batches of one shape (`lcc_jax.data.runner.Runner`: rows split over the mesh, inputs
prefetched): the last batch is filled with dummy chunks whose losses are dropped, so each (model
layout, seqlen, batch) compiles once, also across calls. Only the per-chunk losses leave the device:
logits are formed `block` positions at a time (in the model's dtype, as `transformers` does), and
the log-softmax is fp32, so (batch, seqlen, vocab) fp32 logits never exist at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lcc_jax.data.runner import Runner, batch_rows
from lcc_jax.data.text import load_text
from lcc_jax.errors import UserError

log = logging.getLogger(__name__)

LOGITS_BUDGET_BYTES = 1 << 28  # fp32 logits held at once per batch (256 MiB)


class PerplexityError(UserError):
    """A text too short for one chunk, or settings that cannot run."""


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of a model on one text, and what it took."""

    ppl: float
    nll_mean: float  # mean over chunks of each chunk's mean next-token NLL (nats)
    num_chunks: int  # chunks evaluated
    num_tokens: int  # tokens fed to the model: num_chunks * seqlen (num_chunks * (seqlen - 1) predicted)
    seqlen: int
    seconds: float  # forward passes, compilation excluded
    compile_seconds: float = 0.0
    total_chunks: int = 0  # chunks the whole text holds (before limit_chunks)
    text_tokens: int = 0  # tokens of the whole text
    batch_size: int = 1
    source: str = ""
    chunk_nll: tuple[float, ...] = dataclasses.field(default=(), repr=False)

    @property
    def seconds_per_chunk(self) -> float:
        return self.seconds / max(self.num_chunks, 1)

    def summary(self) -> str:
        of = f"/{self.total_chunks}" if self.total_chunks and self.total_chunks != self.num_chunks else ""
        where = f"{self.source} " if self.source else ""
        return (
            f"{where}ppl {self.ppl:.4f} (nll {self.nll_mean:.5f}) on {self.num_chunks}{of} chunks x "
            f"{self.seqlen} tokens; {self.seconds:.1f} s ({self.seconds_per_chunk:.2f} s/chunk, "
            f"batch {self.batch_size}) + {self.compile_seconds:.1f} s compile"
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["chunk_nll"] = list(self.chunk_nll)
        out["seconds_per_chunk"] = self.seconds_per_chunk
        return out


def perplexity(
    model: nnx.Module,
    tokenizer: Callable[[str], Mapping[str, Any]],
    text_source: str | os.PathLike,
    seqlen: int = 2048,
    batch_size: int | None = None,
    limit_chunks: int | None = None,
    mesh: Mesh | None = None,
    *,
    split: str = "test",
    model_kwargs: Mapping[str, Any] | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on `text_source` ("wikitext2", "c4", a file, "hf:<set>"; see `load_text`).

    `batch_size` defaults to the mesh's batch-axis size (1 without a mesh); `limit_chunks` keeps the
    first N chunks (C4's protocol is 256). `model_kwargs` (arrays, e.g. `compensation=`) go to every
    forward call.
    """
    text = load_text(text_source, split)
    started = time.perf_counter()
    ids = tokenize(tokenizer, text)
    log.info("tokenized %s (%d characters) into %d tokens in %.1f s", text_source, len(text), ids.size,
             time.perf_counter() - started)
    return perplexity_of_tokens(
        model, ids, seqlen, batch_size, limit_chunks, mesh, model_kwargs=model_kwargs, source=str(text_source)
    )


def tokenize(tokenizer: Callable[[str], Mapping[str, Any]], text: str) -> np.ndarray:
    """(tokens,) int32: `tokenizer(text)["input_ids"]`, default special tokens, as Wanda does."""
    with _quiet_length_warning():
        ids = tokenizer(text)["input_ids"]
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise PerplexityError(f"the tokenizer returned input_ids of shape {ids.shape}; expected one sequence.")
    return ids.astype(np.int32)


_wikitext_cache: list[tuple[Any, np.ndarray]] = []  # the last tokenizer and its WikiText-2 test tokens


def wikitext2_test_ids(tokenizer) -> np.ndarray:
    """WikiText-2 test tokens as `perplexity(..., "wikitext2")` tokenizes them, kept for the last tokenizer, so the
    many evaluations of one run (the pipeline's three, a study's members) tokenize the text once."""
    if not (_wikitext_cache and _wikitext_cache[0][0] is tokenizer):
        _wikitext_cache[:] = [(tokenizer, tokenize(tokenizer, load_text("wikitext2", "test")))]
    return _wikitext_cache[0][1]


def make_chunks(ids: np.ndarray, seqlen: int, limit_chunks: int | None = None) -> np.ndarray:
    """(chunks, seqlen): non-overlapping chunks of `ids`, the incomplete tail dropped."""
    if seqlen < 2:
        raise PerplexityError(f"seqlen must be at least 2 (one context and one target token), not {seqlen}.")
    total = ids.size // seqlen
    if total == 0:
        raise PerplexityError(f"the text has {ids.size} tokens, fewer than one chunk of seqlen={seqlen}.")
    keep = total if limit_chunks is None else min(total, limit_chunks)
    if keep < 1:
        raise PerplexityError(f"limit_chunks must be positive, not {limit_chunks}.")
    return ids[: keep * seqlen].reshape(keep, seqlen)


def perplexity_of_tokens(
    model: nnx.Module,
    ids: np.ndarray,  # (tokens,) int
    seqlen: int = 2048,
    batch_size: int | None = None,
    limit_chunks: int | None = None,
    mesh: Mesh | None = None,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    source: str = "",
) -> PerplexityResult:
    """Perplexity of an already tokenized text; see the module docstring for the protocol."""
    ids = np.asarray(ids)
    chunks = make_chunks(ids, seqlen, limit_chunks)  # (chunks, seqlen)
    total_chunks = ids.size // seqlen
    num_chunks = chunks.shape[0]
    # never pad a short evaluation up to a larger batch: dummy chunks cost as much as real ones
    batch_size = batch_rows(None if batch_size is None else min(batch_size, num_chunks), mesh, PerplexityError)
    num_batches = math.ceil(num_chunks / batch_size)
    padded = np.zeros((num_batches * batch_size, seqlen), np.int32)  # dummy chunks: token 0, loss dropped
    padded[:num_chunks] = chunks

    losses: list[np.ndarray] = []

    def collect(_, nll: np.ndarray) -> int:
        losses.append(nll)
        return min(nll.shape[0], num_chunks - (len(losses) - 1) * batch_size)

    runner = Runner(model, _chunk_nll_step, mesh=mesh, model_kwargs=model_kwargs)
    batches = [(i, dict(tokens=padded[i * batch_size : (i + 1) * batch_size])) for i in range(num_batches)]
    stats = runner.run(batches, collect, desc=f"perplexity {source}".strip(), total=num_chunks, unit="chunk")
    seconds, compile_seconds = stats.seconds, stats.compile_seconds

    chunk_nll = np.concatenate(losses)[:num_chunks].astype(np.float64)  # (chunks,)
    nll_mean = float(chunk_nll.mean())
    result = PerplexityResult(
        ppl=math.exp(nll_mean),
        nll_mean=nll_mean,
        num_chunks=num_chunks,
        num_tokens=num_chunks * seqlen,
        seqlen=seqlen,
        seconds=seconds,
        compile_seconds=compile_seconds,
        total_chunks=total_chunks,
        text_tokens=int(ids.size),
        batch_size=batch_size,
        source=source,
        chunk_nll=tuple(chunk_nll.tolist()),
    )
    log.info(result.summary())
    return result


def logits_block(seqlen: int, batch_size: int, vocab: int, budget: int = LOGITS_BUDGET_BYTES) -> int:
    """Positions per logits block: the largest power of two whose fp32 logits fit `budget` (at least 16)."""
    fit = max(budget // (4 * batch_size * vocab), 16)
    block = 1 << (fit.bit_length() - 1)
    return seqlen if block >= seqlen else block


def chunk_nll(model: nnx.Module, tokens: jax.Array, block: int, model_kwargs: Mapping[str, Any]) -> jax.Array:
    """(batch,) fp32 mean next-token NLL of each (batch, seq) chunk over its seq-1 predicted tokens."""
    batch, seq = tokens.shape
    hidden = model(tokens, return_logits=False, **model_kwargs).hidden  # (batch, seq, embed)
    targets = jnp.roll(tokens, -1, axis=1)  # (batch, seq): token t+1 at t; the wrapped last one is masked
    weight = (jnp.arange(seq) < seq - 1).astype(jnp.float32)  # (seq,)
    blocks = -(-seq // block)
    pad = blocks * block - seq
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weight = jnp.pad(weight, (0, pad))

    def block_nll(args):
        h, t = args  # (batch, block, embed), (batch, block)
        logits = model.logits(h).astype(jnp.float32)  # (batch, block, vocab)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked  # (batch, block)

    per_block = (
        hidden.reshape(batch, blocks, block, -1).swapaxes(0, 1),  # (blocks, batch, block, embed)
        targets.reshape(batch, blocks, block).swapaxes(0, 1),  # (blocks, batch, block)
    )
    nll = jax.lax.map(block_nll, per_block).swapaxes(0, 1).reshape(batch, blocks * block)  # (batch, seq+pad)
    return jnp.sum(nll * weight, axis=-1) / (seq - 1)


def _chunk_nll_step(model: nnx.Module, arrays: Mapping[str, jax.Array], model_kwargs: Mapping[str, Any]) -> jax.Array:
    """The runner's step: `chunk_nll` of a (batch, seq) batch, logits in blocks sized for its shape."""
    tokens = arrays["tokens"]
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1 << 17
    return chunk_nll(model, tokens, logits_block(tokens.shape[1], tokens.shape[0], vocab), model_kwargs)


@contextlib.contextmanager
def _quiet_length_warning():
    """transformers warns that a whole corpus exceeds model_max_length; chunking is the point here."""
    logger = logging.getLogger("transformers.tokenization_utils_base")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
