"""Calibration statistics and FLAP-style importance scores for structured (head / channel) pruning.

FLAP (An et al., AAAI 2024) scores an input channel j of an output projection by its *fluctuation*:
the variance of x_j over calibration tokens times the squared norm of the weights that read x_j
(WIFV). A channel that barely fluctuates can be replaced by its mean, whose contribution is a
constant: that constant goes into the output bias (see `structured.structured_prune_layer`).

  MLP channel j:  var_j · ||W_down[j, :]||²          (kernels are (in, out): row j reads x_j)
  head h:         Σ_{j in head h} var_j · ||W_o[j, :]||²
  KV group g:     Σ of its queries_per_kv heads' scores (a KV head and its queries go together)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


class ChannelStats(NamedTuple):
    """Streaming mean and (population) variance of each input channel over real calibration tokens.

    Batches merge with Chan et al.'s parallel update, in fp32, so the result does not depend on how
    the tokens are split into batches. A pytree: carry it through jit / scan.
    """

    count: jax.Array  # () fp32, tokens seen
    mean: jax.Array  # (dim,) fp32
    m2: jax.Array  # (dim,) fp32, sum of squared deviations from the mean

    @classmethod
    def init(cls, dim: int) -> ChannelStats:
        return cls(jnp.zeros((), jnp.float32), jnp.zeros((dim,), jnp.float32), jnp.zeros((dim,), jnp.float32))

    def update(self, x: jax.Array, mask: jax.Array | None = None) -> ChannelStats:
        """Add x (batch, seq, dim) or (tokens, dim); mask (batch, seq) or (tokens,): 1 = real token."""
        if x.ndim not in (2, 3) or x.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"expected x of shape (batch, seq, {self.mean.shape[0]}) or (tokens, dim), got {x.shape}.")
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the tokens of x {tuple(x.shape[:-1])}.")
        return _update(self, x, mask)

    @property
    def variance(self) -> jax.Array:
        """(dim,) population variance (0 before any token)."""
        return self.m2 / jnp.maximum(self.count, 1.0)


@jax.jit
def _update(stats: ChannelStats, x: jax.Array, mask: jax.Array | None) -> ChannelStats:
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)  # (tokens, dim)
    w = jnp.ones(x.shape[:1], jnp.float32) if mask is None else mask.reshape(-1).astype(jnp.float32)
    n_b = jnp.sum(w)
    mean_b = jnp.einsum("t,td->d", w, x, precision=_HIGHEST) / jnp.maximum(n_b, 1.0)
    m2_b = jnp.einsum("t,td->d", w, (x - mean_b) ** 2, precision=_HIGHEST)
    n = stats.count + n_b
    delta = mean_b - stats.mean
    safe_n = jnp.maximum(n, 1.0)
    mean = stats.mean + delta * (n_b / safe_n)
    m2 = stats.m2 + m2_b + delta**2 * (stats.count * n_b / safe_n)
    return ChannelStats(n, mean, m2)


def channel_scores(stats: ChannelStats, kernel: jax.Array) -> jax.Array:
    """(in,) WIFV score of each input channel of a (in, out) kernel: variance · ||row||²."""
    if kernel.shape[0] != stats.mean.shape[0]:
        raise ValueError(f"kernel has {kernel.shape[0]} input channels, statistics have {stats.mean.shape[0]}.")
    k = kernel.astype(jnp.float32)
    return stats.variance * jnp.sum(k * k, axis=1)


def head_scores(stats: ChannelStats, o_kernel: jax.Array, num_heads: int) -> jax.Array:
    """(heads,) score of each query head: the sum of its head_dim channels' scores on o_proj."""
    scores = channel_scores(stats, o_kernel)  # (heads * head_dim,)
    return scores.reshape(num_heads, -1).sum(axis=1)


def group_scores(head_score: jax.Array, num_kv_heads: int) -> jax.Array:
    """(kv_heads,) score of each KV group: query head h reads KV head h // queries_per_kv (HF repeat_kv)."""
    return head_score.reshape(num_kv_heads, -1).sum(axis=1)


def top_indices(scores: jax.Array, keep: int) -> np.ndarray:
    """Indices of the `keep` highest scores, in ascending index order (ties keep the lower index)."""
    s = np.asarray(jax.device_get(scores), np.float64)
    if not 0 < keep <= s.shape[0]:
        raise ValueError(f"cannot keep {keep} of {s.shape[0]} units.")
    order = np.argsort(-s, kind="stable")
    return np.sort(order[:keep])
