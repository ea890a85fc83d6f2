"""Pruning: sparsity specs, masks (True = keep), magnitude, Wanda, SparseGPT, OWL, calibration statistics.

Everything here works per matrix (a Flax kernel (in, out), or a stack (..., in, out) where noted);
the layer-by-layer calibration driver feeds `WandaStats` / `HessianStats` and calls the kernels.
"""

from lcc_jax.pruning.magnitude import magnitude_mask, magnitude_masks, magnitude_scores, prune_magnitude
from lcc_jax.pruning.masks import (
    PRUNABLE,
    Masks,
    MatrixSparsity,
    SparsityReport,
    apply_masks,
    check_masks,
    mask_for_spec,
    masks_from_zeros,
    nm_mask,
    place_like,
    prunable_paths,
    sparsity_report,
    unstructured_mask,
)
from lcc_jax.pruning.owl import outlier_ratio, owl_sparsities
from lcc_jax.pruning.patterns import SparsityError, SparsitySpec
from lcc_jax.pruning.sparsegpt import (
    HessianFactor,
    SparseGPTResult,
    hessian_factor,
    sparsegpt_prune,
    sparsegpt_prune_factored,
)
from lcc_jax.pruning.stats import HessianStats, WandaStats
from lcc_jax.pruning.wanda import wanda_mask, wanda_scores

__all__ = [
    "PRUNABLE",
    "HessianFactor",
    "HessianStats",
    "Masks",
    "MatrixSparsity",
    "SparseGPTResult",
    "SparsityError",
    "SparsityReport",
    "SparsitySpec",
    "WandaStats",
    "apply_masks",
    "check_masks",
    "hessian_factor",
    "magnitude_mask",
    "magnitude_masks",
    "magnitude_scores",
    "mask_for_spec",
    "masks_from_zeros",
    "nm_mask",
    "outlier_ratio",
    "owl_sparsities",
    "place_like",
    "prunable_paths",
    "prune_magnitude",
    "sparsegpt_prune",
    "sparsegpt_prune_factored",
    "sparsity_report",
    "unstructured_mask",
    "wanda_mask",
    "wanda_scores",
]
