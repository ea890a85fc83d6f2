"""Wanda (Sun et al. 2024): score |W| * ||X_j||, pruned per output; per-matrix kernels.

The statistic is `WandaStats.scaler_row` (lcc_jax.pruning.stats), the Wanda repo's running mean of
squared input norms. Unstructured: in every output column prune exactly int(in * ratio) lowest
scores (stable sort, lower index first on ties). N:M: the N lowest of every M consecutive inputs.
Scores are fp32 (|W| upcast times sqrt(scaler_row)), as in the reference's mixed-dtype product.
The reference's optional "variant" (an alpha search on cumulative scores) is not implemented.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lcc_jax.pruning.masks import mask_for_spec, place_like
from lcc_jax.pruning.patterns import SparsityError, SparsitySpec


@jax.jit
def wanda_scores(w: jax.Array, scaler_row: jax.Array) -> jax.Array:
    """|W| * sqrt(scaler_row): w (..., in, out), scaler_row (..., in) -> fp32 (..., in, out)."""
    return jnp.abs(w).astype(jnp.float32) * jnp.sqrt(scaler_row.astype(jnp.float32))[..., :, None]


def wanda_mask(w: jax.Array, scaler_row: jax.Array, spec: SparsitySpec | str) -> jax.Array:
    """Keep mask (True = keep) for one kernel (in, out) or a stack (..., in, out) with scaler rows (..., in)."""
    spec = SparsitySpec.parse(spec)
    if tuple(scaler_row.shape) != tuple(w.shape[:-1]):
        raise SparsityError(
            f"scaler_row shape {tuple(scaler_row.shape)} does not match kernel {tuple(w.shape)} (..., in, out)."
        )
    spec.check_input_dim(w.shape[-2])
    return place_like(mask_for_spec(wanda_scores(w, scaler_row), spec, per_output=True), w)
