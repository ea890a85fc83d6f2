"""Lost components: per-head SVD of what pruning removed from the last-token head outputs.

For each head, ΔZ = Z_dense(q) − Z_pruned(q) (N, d), not centred, fp32, and ΔZ = U S Vᵀ (reduced).
As the reference (`obtain_main_components`):
  * probe-time component c = Σ_{i<K} mean_n(U[n, i]) · S_i · Vᵀ[i]  (K = 10 there, 1 in the paper).
    Flipping the sign of a singular pair flips both U[:, i] and Vᵀ[i], so c does not depend on signs;
  * training basis: the rows of Vᵀ, L2-normalised, zero-padded to (d, d) (fewer rows when N < d).
Kept in fp32 (the reference stores fp16). Each basis row is sign-canonicalised (its largest-magnitude
coordinate made positive), so CPU, GPU and TPU SVDs give the same basis; c is unaffected.

All L·H heads go through one batched `jnp.linalg.svd`, in chunks of heads to bound memory.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

PAPER_K, REFERENCE_K = 1, 10


@dataclasses.dataclass(frozen=True)
class LostComponents:
    """What pruning removed, per head (index l·H + h)."""

    component: np.ndarray  # (heads, d) fp32: probe-time c
    basis: np.ndarray  # (heads, d, d) fp32: rows of Vᵀ, unit or zero
    singular_values: np.ndarray  # (heads, min(N, d)) fp32, descending

    @property
    def head_energy(self) -> np.ndarray:
        """(heads,) Σ S² = ‖ΔZ‖²_F per head."""
        return np.sum(np.square(self.singular_values, dtype=np.float64), axis=-1)

    def layer_energy(self, num_layers: int) -> np.ndarray:
        """(layers,) lost-component energy Σ_h Σ_i S²  of each layer, for plots."""
        return self.head_energy.reshape(num_layers, -1).sum(-1)

    def save(self, path) -> None:
        np.savez(path, component=self.component, basis=self.basis, singular_values=self.singular_values)

    @classmethod
    def load(cls, path) -> LostComponents:
        with np.load(path) as f:
            return cls(component=f["component"], basis=f["basis"], singular_values=f["singular_values"])


def lost_components(
    dense: np.ndarray,  # (N, heads, d): Z_dense(q)
    pruned: np.ndarray,  # (N, heads, d): Z_pruned(q), same heads (see capture.align_heads)
    k: int = REFERENCE_K,
    head_chunk: int = 256,
) -> LostComponents:
    """SVD of ΔZ for every head at once (module docstring); `k` components summed into c."""
    if dense.shape != pruned.shape or dense.ndim != 3:
        raise ValueError(f"dense {dense.shape} and pruned {pruned.shape} must both be (N, heads, head_dim).")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}.")
    n, heads, d = dense.shape
    parts = []
    for start in range(0, heads, head_chunk):
        stop = min(start + head_chunk, heads)
        delta = np.asarray(dense[:, start:stop], np.float32) - np.asarray(pruned[:, start:stop], np.float32)
        parts.append(jax.device_get(_components(jnp.asarray(delta.transpose(1, 0, 2)), k)))
    component, basis, singular = (np.concatenate(p) for p in zip(*parts, strict=True))
    log.info("lost components of %d heads from %d samples (K=%d); total energy %.4g", heads, n, k,
             float(np.square(singular, dtype=np.float64).sum()))
    return LostComponents(component=component, basis=basis, singular_values=singular)


@functools.partial(jax.jit, static_argnums=1)
def _components(delta: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """delta (heads, N, d) -> c (heads, d), basis (heads, d, d), S (heads, min(N, d))."""
    heads, n, d = delta.shape
    u, s, vt = jnp.linalg.svd(delta, full_matrices=False)  # (h, N, m), (h, m), (h, m, d)
    m = s.shape[-1]
    kept = min(k, m)
    weight = jnp.mean(u[:, :, :kept], axis=1) * s[:, :kept]  # (h, K): mean_n U[n, i] · S_i
    component = jnp.einsum("hk,hkd->hd", weight, vt[:, :kept], precision=jax.lax.Precision.HIGHEST)
    vt = vt / jnp.maximum(jnp.linalg.norm(vt, axis=-1, keepdims=True), 1e-12)  # F.normalize(p=2, dim=-1)
    vt = vt * _signs(vt)[..., None]
    basis = jnp.zeros((heads, d, d), vt.dtype).at[:, :m].set(vt)
    return component, basis, s


def _signs(rows: jax.Array) -> jax.Array:
    """(..., m) ±1 making each row's largest-magnitude coordinate positive."""
    top = jnp.take_along_axis(rows, jnp.argmax(jnp.abs(rows), axis=-1)[..., None], axis=-1)[..., 0]
    return jnp.where(top < 0, -1.0, 1.0).astype(rows.dtype)
