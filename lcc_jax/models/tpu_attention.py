"""Splash attention (JAX's Pallas TPU kernel) under lcc_jax's segment-id masks.

`splash_attention(q, k, v, segments)` computes what the XLA path computes for every real query: causal
attention within the query's segment (segment ids, 0 = padding; packed rows, holes and left padding
alike), optionally within a sliding window, GQA by the kernel's own grouping (no repeated K/V). The
kernel sees `SegmentIds(q=segments, kv=segments)` and a `CausalMask` (a `LocalMask` for a sliding
window), so every query keeps at least itself and no row is empty; padding queries attend among padding
and their outputs are set to zero (the XLA path's padding outputs are never read; cuDNN's are zeros too).

The kernel works on (heads, seq, head_dim) tiles of 128 lanes: rows are vmapped, the sequence is
padded with padding (segment 0) to a multiple of the block and sliced back, and head_dim is zero-padded
to a multiple of 128 (zero columns change no logit; the extra value columns are dropped), with the
softmax scale of the true head_dim. Under a mesh the kernel runs per shard (`jax.shard_map`: rows over
the batch axes, heads over "tensor" where it divides q's and k's heads), since XLA cannot partition a
Pallas call. Off TPU it runs in Pallas interpret mode (slow; for tests and forced runs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lcc_jax.sharding import activation_spec

LANES = 128  # the kernel's tile width: block sizes and (here) head_dim are multiples of it
MAX_BLOCK = 512  # largest query/key block; shorter rows use one block of their padded length


def splash_attention(
    q: jax.Array,  # (batch, seq, heads, head_dim)
    k: jax.Array,  # (batch, seq, kv_heads, head_dim)
    v: jax.Array,
    segments: jax.Array,  # (batch, seq) int: 0 = padding, k > 0 = k-th packed sequence of the row
    sliding_window: int | None = None,
    *,
    interpret: bool | None = None,  # None: interpret unless the backend is a TPU
) -> jax.Array:
    """Causal self-attention within segments: (batch, seq, heads, head_dim), zeros at padding queries."""
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    batch, seq, heads, head_dim = q.shape
    if heads % k.shape[2]:
        raise ValueError(f"{heads} query heads do not group over {k.shape[2]} key/value heads.")
    block = min(MAX_BLOCK, _round_up(seq, LANES))
    padded_seq, padded_dim = _round_up(seq, block), _round_up(head_dim, LANES)
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    q, k, v = (jnp.pad(x, ((0, 0), (0, padded_seq - seq), (0, 0), (0, padded_dim - head_dim))) for x in (q, k, v))
    ids = jnp.pad(segments.astype(jnp.int32), ((0, 0), (0, padded_seq - seq)))
    local = functools.partial(_local, block=block, sliding_window=sliding_window, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        layout = ("batch", None, "heads", None)
        spec = activation_spec(q.shape, layout, mesh)
        if activation_spec(k.shape, layout, mesh) != spec:  # kv heads do not split like q's: keep heads whole
            spec = PartitionSpec(spec[0], None, None, None)
        if any(s is not None for s in spec):
            local = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, PartitionSpec(spec[0], None)),
                                  out_specs=spec, check_vma=False)
    out = local(q, k, v, ids)[:, :seq, :, :head_dim]
    real = (segments > 0)[:, :, None, None]
    return jnp.where(real, out, jnp.zeros((), out.dtype))


def _local(q, k, v, ids, *, block: int, sliding_window: int | None, interpret: bool) -> jax.Array:
    """The kernel over the rows and heads at hand; (b, s, h, d) in and out, s a multiple of `block`."""
    # JAX's experimental kernel, imported where it runs: a release that moves it fails this call (which
    # `attention.attention` turns into XLA attention), not `import lcc_jax`.
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    kernel = _kernel(q.shape[1], q.shape[2], block, sliding_window, interpret)

    def row(q, k, v, ids):  # (heads, seq, head_dim) each
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids))

    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    out = jax.vmap(row)(heads_first(q), heads_first(k), heads_first(v), ids)
    return heads_first(out)


def _kernel(seq: int, heads: int, block: int, sliding_window: int | None, interpret: bool):
    """The splash kernel for one (seq, heads) shape (JAX caches the NumPy walk over the mask's blocks; the kernel
    itself holds arrays made while tracing, so it is built per trace, not cached here)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # experimental: see _local

    if sliding_window is None:
        mask = splash.CausalMask((seq, seq))
    else:  # key >= query - (window - 1) and key <= query: causal, `window` keys back counting itself
        mask = splash.LocalMask((seq, seq), window_size=(sliding_window - 1, 0), offset=0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
