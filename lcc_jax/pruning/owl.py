"""OWL (Yin et al. 2024): outlier-weighted layerwise sparsity ratios.

Follows the OWL repo (luuyin/OWL, lib/prune_all.py, prune_wanda_outlier):
  1. per decoder layer, concatenate the Wanda scores |W| * sqrt(scaler_row) of all its prunable
     kernels (statistics from the *dense* model) and take the outlier ratio D = fraction of scores
     > M * mean(scores) (the reference reports it in percent; the next step is scale-free);
  2. D <- (D - min D) * (1 / (max D - min D) * lambda * 2);  D <- D - mean(D) + (1 - target);
     layer sparsity = 1 - D, and a layer at or below 0 gets 0.01.
So densities span [mean - lambda, mean + lambda] around 1 - target: more outliers, less pruning.
Defaults M = 5, lambda = 0.08 (the repo's documented LLaMA settings). OWL's mixed per-layer N:M
variants are not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcc_jax.pruning.patterns import SparsityError


@jax.jit
def _outlier_fraction(scores: Sequence[jax.Array], m: float) -> jax.Array:
    flat = jnp.concatenate([jnp.ravel(s).astype(jnp.float32) for s in scores])
    return jnp.mean(flat > jnp.mean(flat) * m)


def outlier_ratio(scores: jax.Array | Sequence[jax.Array], m: float = 5.0) -> float:
    """Fraction (not percent) of one layer's scores above m * their mean; pass all of the layer's kernels' scores."""
    scores = [scores] if isinstance(scores, (jax.Array, np.ndarray)) else list(scores)
    return float(_outlier_fraction(scores, jnp.float32(m)))


def owl_sparsities(outlier_ratios: Sequence[float], target: float, lam: float = 0.08) -> np.ndarray:
    """Per-layer unstructured sparsities (float64, one per layer) averaging to `target`, from outlier ratios.

    With all ratios equal (the reference would divide by zero) every layer gets `target`.
    """
    d = np.asarray(outlier_ratios, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise SparsityError(f"owl_sparsities needs one outlier ratio per layer, got {outlier_ratios!r}.")
    if not 0.0 <= target < 1.0:
        raise SparsityError(f"target sparsity must be in [0, 1), got {target}.")
    if d.max() == d.min():
        return np.full(d.shape, float(target))
    d = (d - d.min()) * (1 / (d.max() - d.min()) * lam * 2)
    d = d - np.mean(d) + (1 - target)
    sparsity = 1 - d
    sparsity[sparsity <= 0] = 0.01
    if np.any(sparsity >= 1.0):
        raise SparsityError(
            f"OWL with target {target} and lambda {lam} gives layer sparsities >= 1 ({sparsity.max():.4f}); "
            "lower lambda."
        )
    return sparsity
