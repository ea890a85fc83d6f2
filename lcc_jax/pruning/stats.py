"""Calibration statistics of one linear layer's input, accumulated batch by batch in fp32.

Both follow the Wanda repo's update rules exactly (lib/layerwrapper.py WrappedGPT and
lib/sparsegpt.py SparseGPT.add_batch), including what counts as a sample: a (batch, seq, in)
input adds `batch` samples (sequences, not tokens); a 2-d (tokens, in) input adds one.

  WandaStats:   s <- s * n/(n+b);  n <- n+b;  s <- s + sum_tokens x**2 / n    (per input feature)
  HessianStats: H <- H * n/(n+b);  n <- n+b;  x <- sqrt(2/n) x;  H <- H + x^T x

So s = (1/n) sum x**2 and H = (2/n) sum x x^T over every token seen, n the number of sequences.
The optional `token_mask` (batch, seq) drops padding tokens from the sums (the count is unchanged).
Both are pytrees: carry them through jit / scan.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _tokens(x: jax.Array, token_mask: jax.Array | None) -> tuple[jax.Array, int]:
    """(batch, seq, in) or (tokens, in) -> fp32 (tokens, in) with padding zeroed, and the sample count."""
    if x.ndim not in (2, 3):
        raise ValueError(f"calibration input must be (batch, seq, in) or (tokens, in), got shape {x.shape}.")
    count = x.shape[0] if x.ndim == 3 else 1
    x = x.astype(jnp.float32)
    if token_mask is not None:
        x = x * token_mask.reshape(x.shape[:-1] + (1,)).astype(jnp.float32)
    return x.reshape(-1, x.shape[-1]), count


class WandaStats(NamedTuple):
    """Wanda's `scaler_row`: mean over samples of each input feature's squared L2 norm."""

    scaler_row: jax.Array  # (in,) fp32
    nsamples: jax.Array  # () int32

    @classmethod
    def init(cls, in_features: int) -> WandaStats:
        return cls(jnp.zeros((in_features,), jnp.float32), jnp.zeros((), jnp.int32))

    def update(self, x: jax.Array, token_mask: jax.Array | None = None) -> WandaStats:
        return _wanda_update(self, x, token_mask)


@jax.jit
def _wanda_update(stats: WandaStats, x: jax.Array, token_mask: jax.Array | None) -> WandaStats:
    x, count = _tokens(x, token_mask)  # (tokens, in)
    n = stats.nsamples
    total = n + count
    scaler = stats.scaler_row * (n.astype(jnp.float32) / total.astype(jnp.float32))
    scaler = scaler + jnp.sum(x * x, axis=0) / total.astype(jnp.float32)
    return WandaStats(scaler, total)


class HessianStats(NamedTuple):
    """SparseGPT's layer Hessian H = 2/n sum x x^T over the calibration tokens."""

    hessian: jax.Array  # (in, in) fp32
    nsamples: jax.Array  # () int32

    @classmethod
    def init(cls, in_features: int) -> HessianStats:
        return cls(jnp.zeros((in_features, in_features), jnp.float32), jnp.zeros((), jnp.int32))

    def update(self, x: jax.Array, token_mask: jax.Array | None = None) -> HessianStats:
        return _hessian_update(self, x, token_mask)


@jax.jit
def _hessian_update(stats: HessianStats, x: jax.Array, token_mask: jax.Array | None) -> HessianStats:
    x, count = _tokens(x, token_mask)  # (tokens, in)
    n = stats.nsamples
    total = n + count
    h = stats.hessian * (n.astype(jnp.float32) / total.astype(jnp.float32))
    x = jnp.sqrt(2.0 / total.astype(jnp.float32)) * x
    h = h + jnp.matmul(x.T, x, precision=_HIGHEST)
    return HessianStats(h, total)
