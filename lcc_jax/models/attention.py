"""Attention masks as segment ids, and the choice between XLA's attention, cuDNN's and the TPU's splash kernel.

A row of `attention_mask` (batch, seq) holds segment ids: 0 = padding, k > 0 = the k-th sequence
of that row. An ordinary right-padded mask (1 then 0) is one segment per row; *packed* rows hold
several sequences back to back (see `lcc_jax.data.batching.pack_batch`), each attending only to
itself, causally, with its positions restarting at 0. Every query of segment k sees the keys of
segment k up to itself; padding queries see every earlier real key, as before packing existed (their
outputs are never read, and so never NaN).

Implementations (`resolve_attention`): "xla" builds the (batch, 1, seq, seq) boolean mask and works
for any mask. "cudnn" is cuDNN's flash attention (bf16/fp16 on NVIDIA GPUs): causal with per-row
lengths for right-padded rows, or cuDNN's packed layout (per-segment lengths and offsets) when the
caller traces inside `packed_rows(max_segments)`. cuDNN assumes right padding: rows with holes or
left padding need "xla". "splash" is JAX's Pallas splash attention kernel for TPUs
(`lcc_jax.models.tpu_attention`): segment ids, any packing, GQA and sliding windows, bf16 or fp32; off
a TPU it runs in Pallas interpret mode (slow: for tests). None/"auto" picks cuDNN on a GPU and splash on
a TPU when they apply, else XLA; the environment variable LCC_ATTENTION=xla|cudnn|splash overrides
"auto" (e.g. to fall back without editing code). A fused kernel refused while tracing falls back to XLA
with a warning, unless it was asked for explicitly (`impl`).

XLA's attention is differentiated by recomputing its scores (`jax.checkpoint`): the backward pass keeps q, k, v
and the segment ids, not every layer's (batch, heads, seq, seq) probabilities, as the fused kernels do. Without it
a 7B-shape train step on 3,072-token rows asked an H100 for 52.93 GiB; `recomputed_scores(False)` keeps them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
from collections.abc import Iterator
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from lcc_jax.models import tpu_attention
from lcc_jax.sharding import activation_spec

log = logging.getLogger(__name__)

AttentionImpl = None | Literal["auto", "xla", "cudnn", "splash"]
IMPLEMENTATIONS = ("xla", "cudnn", "splash")
ATTENTION_ENV = "LCC_ATTENTION"

_MAX_SEGMENTS: contextvars.ContextVar[int] = contextvars.ContextVar("lcc_jax_max_segments", default=1)
_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("lcc_jax_attention", default=None)
_RECOMPUTE: contextvars.ContextVar[bool] = contextvars.ContextVar("lcc_jax_recompute_scores", default=True)


@contextlib.contextmanager
def attention_implementation(impl: AttentionImpl) -> Iterator[None]:
    """Trace inside this block to use `impl` wherever a model left the choice to "auto" (None: no change)."""
    _check(impl)
    token = _OVERRIDE.set(None if impl == "auto" else impl)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


@contextlib.contextmanager
def recomputed_scores(on: bool) -> Iterator[None]:
    """Trace inside this block to have XLA attention's backward pass recompute its scores (True, the default) or
    keep them from the forward pass (False: more memory, the attention's forward not run twice)."""
    token = _RECOMPUTE.set(bool(on))
    try:
        yield
    finally:
        _RECOMPUTE.reset(token)


@contextlib.contextmanager
def packed_rows(max_segments: int) -> Iterator[None]:
    """Trace the model inside this block to read masks as rows of up to `max_segments` packed sequences.

    Only the cuDNN path needs the bound (its packed layout has a static number of segments per row);
    the XLA and splash paths read segments from the mask alone.
    """
    if max_segments < 1:
        raise ValueError(f"max_segments must be positive, not {max_segments}.")
    token = _MAX_SEGMENTS.set(int(max_segments))
    try:
        yield
    finally:
        _MAX_SEGMENTS.reset(token)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("segments", "branches"),
                   meta_fields=("max_segments", "sliding_window"))
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query sees, shared by every layer of one forward pass.

    `branches` (optional) makes a segment a prefix tree: its tokens of branch 0 are a shared prefix that
    every later token sees, and a token of branch i > 0 sees the prefix and the earlier tokens of branch i
    only. Zero-shot scoring puts a document's context once and each choice's continuation as a branch
    (`eval.loglik`), half the tokens of scoring each choice with its own copy of the context. Only the XLA
    path reads branches (and the caller gives the positions, which restart at the prefix's end per branch).
    """

    segments: jax.Array  # (batch, seq) int32: 0 = padding, k > 0 = k-th packed sequence of the row
    branches: jax.Array | None = None  # (batch, seq) int32: 0 = shared prefix, i > 0 = i-th branch after it
    max_segments: int = 1  # static: most segments in a row (1 = plain right-padded rows)
    sliding_window: int | None = None  # Mistral: a query sees at most this many keys back (itself included)

    @classmethod
    def build(cls, attention_mask: jax.Array | AttentionMask | None, batch: int, seq: int,
              sliding_window: int | None = None) -> AttentionMask:
        """From an HF-style mask (1 = real) or segment ids; None means every token is real; an AttentionMask is
        kept as it is (with the model's sliding window)."""
        if isinstance(attention_mask, AttentionMask):
            if attention_mask.branches is not None and sliding_window is not None:
                raise ValueError("a mask with branches cannot be windowed: the window counts packed positions.")
            return dataclasses.replace(attention_mask, sliding_window=sliding_window)
        if attention_mask is None:
            segments = jnp.ones((batch, seq), jnp.int32)
        else:
            segments = attention_mask.astype(jnp.int32)
        return cls(segments, None, _MAX_SEGMENTS.get(), sliding_window)

    def dense(self) -> jax.Array:
        """(batch, 1, seq, seq) bool, True = attend: causal, windowed, within the query's segment (and branch)."""
        allowed = segment_mask_4d(self.segments, self.sliding_window)
        if self.branches is None:
            return allowed
        branch_q, branch_k = self.branches[:, None, :, None], self.branches[:, None, None, :]
        return allowed & ((branch_k == 0) | (branch_k == branch_q))

    def positions(self) -> jax.Array:
        """(batch, seq) int32 RoPE positions: 0.. from each packed segment's start.

        The first segment starts at 0 whatever precedes it, so a left-padded row keeps HF's 0..seq-1.
        """
        seg = self.segments
        batch, seq = seg.shape
        index = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        previous = jnp.concatenate([jnp.zeros((batch, 1), seg.dtype), seg[:, :-1]], axis=1)
        starts = jnp.where((seg != previous) & (seg > 1), index, 0)
        return index - jax.lax.cummax(starts, axis=1)


def segment_mask_4d(segments: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """(batch, 1, seq, seq) bool from (batch, seq) segment ids (0 = padding)."""
    seq = segments.shape[1]
    query = jnp.arange(seq)[:, None]
    key = jnp.arange(seq)[None, :]
    allowed = key <= query
    if sliding_window is not None:
        allowed = allowed & (query - key < sliding_window)
    seg_q = segments[:, None, :, None]
    seg_k = segments[:, None, None, :]
    return allowed[None, None] & (seg_k > 0) & ((seg_q == seg_k) | (seg_q == 0))


def _check(impl) -> None:
    if impl not in (None, "auto", *IMPLEMENTATIONS):
        raise ValueError(f"attention implementation must be None, 'auto', 'xla', 'cudnn' or 'splash', not {impl!r}.")


def resolve_attention(impl: AttentionImpl, dtype, head_dim: int, sliding_window: int | None = None) -> str:
    """"xla", "cudnn" or "splash": an explicit choice wins, then `attention_implementation`, then $LCC_ATTENTION,
    then cuDNN where it applies (GPU, bf16/fp16, head_dim a multiple of 8 up to 256, no sliding window), then
    splash where it applies (TPU, bf16/fp32, head_dim up to 256, padded to 128 lanes), else XLA."""
    _check(impl)
    if impl in IMPLEMENTATIONS:
        return impl
    if _OVERRIDE.get() is not None:
        return _OVERRIDE.get()
    env = os.environ.get(ATTENTION_ENV, "auto").lower()
    if env in IMPLEMENTATIONS:
        return env
    backend, dtype = jax.default_backend(), jnp.dtype(dtype)
    if (backend == "gpu" and dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0
            and head_dim <= 256 and sliding_window is None):
        return "cudnn"
    if backend == "tpu" and dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)) and head_dim <= 256:
        return "splash"
    return "xla"


def attention(
    q: jax.Array,  # (batch, seq, heads, head_dim)
    k: jax.Array,  # (batch, seq, kv_heads, head_dim)
    v: jax.Array,
    mask: AttentionMask | jax.Array,  # or a (batch, 1, seq, seq) bool array (XLA only)
    impl: AttentionImpl = None,
) -> jax.Array:
    """Causal self-attention under `mask`: (batch, seq, heads, head_dim)."""
    if not isinstance(mask, AttentionMask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    chosen = "xla" if mask.branches is not None else resolve_attention(impl, q.dtype, q.shape[-1], mask.sliding_window)
    if chosen == "splash":
        try:
            return tpu_attention.splash_attention(q, k, v, mask.segments, mask.sliding_window)
        except (NotImplementedError, ValueError, TypeError, ImportError, AttributeError) as e:
            if impl == "splash":  # refused while tracing (shapes, versions, a changed API)
                raise
            _warn_once(f"splash attention unavailable ({e}); using XLA attention")
    if chosen == "cudnn":
        try:
            out = _cudnn(q, k, v, mask)
        except (NotImplementedError, ValueError, RuntimeError, TypeError, ImportError, AttributeError) as e:
            # refused while tracing (shapes, versions, a changed private API)
            if impl == "cudnn":
                raise
            _warn_once(f"cuDNN attention unavailable ({e}); using XLA attention")
        else:
            real = (mask.segments > 0)[:, :, None, None]
            return jnp.where(real, out, jnp.zeros((), out.dtype))  # padded queries: zeros, never stale memory
    if not _RECOMPUTE.get():
        return _xla(q, k, v, mask)
    return jax.checkpoint(_xla, policy=jax.checkpoint_policies.nothing_saveable)(q, k, v, mask)


def _xla(q, k, v, mask: AttentionMask) -> jax.Array:
    """XLA's attention under `mask`, its (batch, 1, seq, seq) mask built here (from O(seq) segment ids, so a
    recomputing backward pass keeps only those)."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), implementation="xla")


def _cudnn(q, k, v, mask: AttentionMask) -> jax.Array:
    segments = mask.segments
    real = (segments > 0)[:, :, None, None]
    # cuDNN leaves the gradients of padded positions unwritten; zero them so stale memory never reaches
    # what is trained (a compensation is added at every position, padding included).
    q, k, v = (_real_cotangent(x, real) for x in (q, k, v))
    if mask.max_segments == 1:  # right-padded rows: causal with per-row lengths
        lengths = jnp.sum(segments > 0, axis=1, dtype=jnp.int32)
        q, k, v, lengths = _cudnn_layout(q, k, v, lengths)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                            key_value_seq_lengths=lengths, implementation="cudnn")
    # JAX's private cuDNN module, imported where it runs: a release that moves it fails this call (which
    # `attention` turns into XLA attention), not `import lcc_jax`.
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    seqlen, offsets = segment_layout(segments, mask.max_segments)
    groups = q.shape[2] // k.shape[2]
    if groups > 1:  # JAX scales the key offsets by the query's heads: give K and V as many heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    q, k, v, seqlen, offsets = _cudnn_layout(q, k, v, seqlen, offsets)
    return cudnn_attention(q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets, kv_offsets=offsets,
                           scale=float(1.0 / np.sqrt(q.shape[-1])), mask_type=MaskType.PADDING_CAUSAL)


def _cudnn_layout(q, k, v, *per_row):
    """q, k, v and the per-row length arrays pinned to the one layout cuDNN's partitioner accepts under a mesh.

    It refuses to partition unless q, k and v share one sharding with whole sequence and head_dim
    dimensions, and it slices the length arrays like q's batch, so nothing is left to propagation.
    (Under fsdp on two H200s it refused the attention, compiled then without a mesh in the compile
    threads; that and this pinning are fixed and tested on CPU, not yet re-run there.) Rows go over
    the batch axes, heads over "tensor" where it divides both q's and k's heads. No-op without a mesh.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (q, k, v, *per_row)
    layout = ("batch", None, "heads", None)
    spec = activation_spec(q.shape, layout, mesh)
    if activation_spec(k.shape, layout, mesh) != spec:
        spec = PartitionSpec(spec[0], None, None, None)
    pin = jax.lax.with_sharding_constraint
    q, k, v = (pin(x, spec) for x in (q, k, v))
    return (q, k, v, *(pin(x, PartitionSpec(spec[0], *([None] * (x.ndim - 1)))) for x in per_row))


def segment_layout(segments: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """cuDNN's packed layout: lengths (batch, M) and start offsets (batch, M + 1), -1 where a row has fewer.

    Segments must be contiguous and numbered 1, 2, ... from the row's start (as `pack_batch` writes them).
    """
    ids = jnp.arange(1, max_segments + 1, dtype=segments.dtype)
    member = segments[:, :, None] == ids  # (batch, seq, M)
    counts = jnp.sum(member, axis=1, dtype=jnp.int32)  # (batch, M)
    starts = jnp.argmax(member, axis=1).astype(jnp.int32)
    present = counts > 0
    seqlen = jnp.where(present, counts, -1)
    offsets = jnp.where(present, starts, -1)
    offsets = jnp.concatenate([offsets, jnp.full((segments.shape[0], 1), -1, jnp.int32)], axis=1)
    return seqlen, offsets


@jax.custom_vjp
def _real_cotangent(x: jax.Array, real: jax.Array) -> jax.Array:
    """Identity whose cotangent is zeroed where `real` is False (broadcast over x)."""
    return x


def _real_cotangent_fwd(x, real):
    return x, real


def _real_cotangent_bwd(real, g):
    return jnp.where(real, g, jnp.zeros((), g.dtype)), None


_real_cotangent.defvjp(_real_cotangent_fwd, _real_cotangent_bwd)


def compile_error_summary(error: BaseException, limit: int = 300) -> str:
    """The first and the last line of a compiler error: XLA wraps a Python failure (a custom
    partitioner's, say) in a traceback whose first line names only where and whose last line says why."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[0][:limit] if len(lines) == 1 else f"{lines[0][:limit]} ... {lines[-1][:limit]}"


@functools.lru_cache(maxsize=8)
def _warn_once(message: str) -> None:
    log.warning(message)
