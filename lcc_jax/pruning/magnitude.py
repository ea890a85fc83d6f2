"""Magnitude pruning: score |W|; unstructured with one threshold per matrix, or N:M per group.

Follows the Wanda repo's prune_magnitude: t = sorted(|W|.ravel())[int(numel * ratio)] and every
weight with |W| <= t is pruned (so ties at t all go); N:M prunes the N smallest |W| of each group of
M consecutive inputs, per output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lcc_jax.pruning.masks import Masks, apply_masks, mask_for_spec, prunable_paths
from lcc_jax.pruning.patterns import SparsitySpec
from lcc_jax.sharding import flat_params


def magnitude_scores(w: jax.Array) -> jax.Array:
    """|W|, (..., in, out)."""
    return jnp.abs(w)


def magnitude_mask(w: jax.Array, spec: SparsitySpec | str) -> jax.Array:
    """Keep mask (True = keep) for one kernel or a stack of them, (..., in, out); per-matrix thresholds."""
    spec = SparsitySpec.parse(spec)
    spec.check_input_dim(w.shape[-2])
    return mask_for_spec(magnitude_scores(w), spec, per_output=False)


def magnitude_masks(model, spec: SparsitySpec | str, paths: list[str] | None = None) -> Masks:
    """Keep masks for every prunable kernel of `model` (each layer of a stacked kernel on its own), sharded like it."""
    spec = SparsitySpec.parse(spec)
    flat = flat_params(model)
    paths = prunable_paths(flat) if paths is None else paths
    for path in paths:
        spec.check_input_dim(flat[path].shape[-2], path)
    return {path: magnitude_mask(flat[path][...], spec) for path in paths}


def prune_magnitude(model: nnx.Module, spec: SparsitySpec | str) -> Masks:
    """Magnitude-prune every prunable kernel of `model` in place; returns the masks."""
    masks = magnitude_masks(model, spec)
    apply_masks(model, masks)
    return masks
