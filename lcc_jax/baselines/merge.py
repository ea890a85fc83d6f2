"""Merge trained baselines into the weights, and say how much of the pruning survives.

* LoRA / DoRA: `merge_lora` writes W' (see `lora.adapted_kernel`) into the kernels. A dense merge
  fills the pruned zeros with ΔW and destroys the sparsity; `surviving_sparsity` reports exactly how
  much. A masked merge (masks given, or an adapter trained with `masked=True`) keeps every zero.
* LoFiT's bias vectors, bias-only and RestoreLCC compensations are per-head vectors at the o_proj
  input: `merge_head_vectors` folds them into an o_proj bias (`restore.fold`), weights untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from lcc_jax.baselines.kernels import target_name, with_kernels
from lcc_jax.baselines.lora import LoraParams, LoraSetup, adapted_kernels, target_weights
from lcc_jax.models import CausalLM
from lcc_jax.pruning.masks import place_like
from lcc_jax.restore.compensation import Compensation, dense_compensation
from lcc_jax.restore.fold import fold_compensation
from lcc_jax.sharding import flat_params


def merge_lora(
    model: nnx.Module, trainable: LoraParams, setup: LoraSetup, masks: Mapping[str, jax.Array] | None = None
) -> nnx.Module:
    """A new model with the adapter merged into its kernels (`model` is left as it was).

    `masks` ({param path or target name: keep}) masks the merge; without them the adapter's own
    setup decides (masked training merges masked, otherwise dense). The merged model computes what
    `apply_lora` computed, up to rounding W' to the kernels' dtype.
    """
    if masks is not None:
        named = {target_name(k): jnp.asarray(v, bool) for k, v in masks.items()}
        setup = dataclasses.replace(setup, masks={k: v for k, v in named.items() if k in trainable}, masked=True)
    weights = target_weights(model, trainable)
    merged = jax.jit(adapted_kernels)(weights, trainable, setup)
    return with_kernels(model, {path: place_like(w, weights[path]) for path, w in merged.items()})


@dataclasses.dataclass(frozen=True)
class SparsitySurvival:
    """How many of the weights a mask set prunes are still exactly zero in a model."""

    pruned: int  # weights the masks prune (False)
    still_zero: int  # of those, exact zeros in the model
    size: int  # weights in the masked kernels
    per_matrix: dict[str, float]  # param path -> still_zero / pruned over its layers

    @property
    def target(self) -> float:
        """The masks' sparsity: pruned / size."""
        return self.pruned / self.size if self.size else 0.0

    @property
    def surviving(self) -> float:
        """The sparsity the model keeps: still_zero / size (== target when nothing was revived)."""
        return self.still_zero / self.size if self.size else 0.0

    @property
    def survival(self) -> float:
        """still_zero / pruned: 1.0 when every pruned weight is still zero."""
        return self.still_zero / self.pruned if self.pruned else 1.0

    @property
    def revived(self) -> int:
        """Pruned weights that are no longer zero (a dense merge revives almost all)."""
        return self.pruned - self.still_zero

    def summary(self) -> str:
        return (f"sparsity {100 * self.surviving:.2f}% of {100 * self.target:.2f}% survives "
                f"({self.revived:,} of {self.pruned:,} pruned weights revived)")


def surviving_sparsity(model: nnx.Module, masks: Mapping[str, jax.Array]) -> SparsitySurvival:
    """Audit `model` against the pruning `masks` ({param path: keep}): which pruned weights are still zero."""
    flat = flat_params(model)
    pruned = still = size = 0
    per_matrix = {}
    for path, keep in masks.items():
        p, z = (int(x.sum()) for x in jax.device_get(_count(flat[path][...], keep)))
        pruned, still, size = pruned + p, still + z, size + int(keep.size)
        per_matrix[path] = z / p if p else 1.0
    return SparsitySurvival(pruned=pruned, still_zero=still, size=size, per_matrix=per_matrix)


@jax.jit
def _count(w: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(pruned, pruned and still zero) per leading index (layer): int32 cannot overflow per matrix."""
    pruned = ~keep.astype(bool)
    axes = tuple(range(1, w.ndim)) if w.ndim > 2 else None
    return jnp.sum(pruned, axis=axes, dtype=jnp.int32), jnp.sum(pruned & (w == 0), axis=axes, dtype=jnp.int32)


def merge_head_vectors(model: CausalLM, comp: Compensation) -> CausalLM:
    """Fold per-head vectors (LoFiT bias, bias-only, RestoreLCC) into o_proj's bias; weights unchanged."""
    return fold_compensation(model, dense_compensation(comp, model.config))
