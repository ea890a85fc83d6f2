"""Rotary position embedding in Hugging Face's rotate-half layout (default, linear and llama3 scaling)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lcc_jax.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """inv_freq: (head_dim // 2,) in float32, with the config's scaling applied."""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    if rope.type == "linear":
        return (inv_freq / rope.factor).astype(np.float32)
    if rope.type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rotary_tables(
    positions: jax.Array,  # (batch, seq) int
    inv_freq: np.ndarray,  # (head_dim // 2,)
    dtype: jnp.dtype,
) -> tuple[jax.Array, jax.Array]:
    """cos, sin: (batch, seq, head_dim), computed in fp32 and cast to the activation dtype as HF does."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(
    x: jax.Array,  # (batch, seq, heads, head_dim)
    cos: jax.Array,  # (batch, seq, head_dim)
    sin: jax.Array,
) -> jax.Array:
    return x * cos[:, :, None, :] + _rotate_half(x) * sin[:, :, None, :]
