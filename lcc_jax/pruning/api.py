"""`prune(model, calibration, method=..., sparsity=... | structured=...)`: one entry point for every method."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcc_jax.fields import described
from lcc_jax.models.llama import CausalLM
from lcc_jax.pruning.magnitude import magnitude_masks
from lcc_jax.pruning.masks import Masks, apply_masks
from lcc_jax.pruning.owl import outlier_ratio, owl_sparsities
from lcc_jax.pruning.patterns import SparsityError, SparsitySpec
from lcc_jax.pruning.sequential import INPUT_GROUPS, CalibrationStates, iterate_layers, write_layer
from lcc_jax.pruning.sparsegpt import hessian_factor, sparsegpt_prune_factored
from lcc_jax.pruning.stats import HessianStats, WandaStats
from lcc_jax.pruning.structured import assemble_structured, driver_hooks, structured_plan
from lcc_jax.pruning.wanda import wanda_mask, wanda_scores

log = logging.getLogger(__name__)

Method = Literal["magnitude", "wanda", "sparsegpt", "flap"]
METHODS = ("magnitude", "wanda", "sparsegpt", "flap")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. Exactly one of `sparsity` (ratio or "N:M") and `structured` (a ratio)."""

    method: str = described("wanda", "magnitude | wanda | sparsegpt | flap (structured)")
    sparsity: str | None = described("0.5", "unstructured ratio ('0.5', '50%') or N:M pattern ('2:4', '4:8')")
    structured: float | None = described(None, "method flap: fraction of attention + MLP parameters removed, e.g. 0.2")
    owl: bool = described(False, "OWL outlier-weighted layer-wise sparsity (wanda/sparsegpt, unstructured)")
    owl_lambda: float = described(0.08, "OWL: half-width of the per-layer sparsity range")
    owl_m: float = described(5.0, "OWL: outlier threshold, in multiples of the layer's mean score")
    batch_size: int = described(8, "calibration sequences per jitted step")
    blocksize: int = described(128, "SparseGPT: columns per lazy-update block")
    percdamp: float = described(0.01, "SparseGPT: Hessian damping, as a fraction of its mean diagonal")

    def __post_init__(self):
        if self.method not in METHODS:
            raise SparsityError(f"unknown pruning method {self.method!r}; choose from {', '.join(METHODS)}.")
        if self.method == "flap":
            if self.structured is None:
                raise SparsityError("method 'flap' (structured) needs structured=<ratio>, e.g. 0.2.")
        elif self.structured is not None:
            raise SparsityError(f"structured={self.structured} needs method='flap', not {self.method!r}.")
        elif self.sparsity is None:
            raise SparsityError(f"method {self.method!r} needs sparsity='0.5' or a pattern like '2:4'.")
        else:
            spec = SparsitySpec.parse(self.sparsity)
            if self.owl and spec.is_nm:
                raise SparsityError("OWL sets per-layer unstructured ratios; it does not apply to N:M patterns.")
        if self.owl and self.method not in ("wanda", "sparsegpt"):
            raise SparsityError("OWL applies to wanda and sparsegpt only.")

    @property
    def spec(self) -> SparsitySpec:
        return SparsitySpec.parse(self.sparsity)

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude"


@dataclasses.dataclass
class PruneResult:
    model: CausalLM
    masks: Masks  # {path: bool (layers, in, out)}, True = keep; empty for structured pruning
    head_map: np.ndarray | None  # structured: (layers, H') dense head index l·H + h of each kept head
    layer_sparsity: np.ndarray | None  # OWL: the per-layer ratios used
    seconds: float


def prune(
    model: CausalLM,
    calibration: np.ndarray | None = None,  # (nsamples, seqlen) int tokens
    config: PruneConfig | None = None,
    *,
    mesh: Mesh | None = None,
    **overrides,
) -> PruneResult:
    """Prune `model` (in place for unstructured/N:M; a new, smaller model for structured)."""
    config = dataclasses.replace(config or PruneConfig(), **overrides)
    start = time.perf_counter()
    if config.method == "magnitude":
        masks = magnitude_masks(model, config.spec)
        apply_masks(model, masks)
        return PruneResult(model, masks, None, None, time.perf_counter() - start)
    if calibration is None:
        raise SparsityError(f"{config.method} needs calibration tokens (lcc_jax.data.calibration.calibration_tokens).")
    calibration = np.asarray(calibration)
    batch_size = min(config.batch_size, len(calibration))
    if len(calibration) % batch_size:
        raise SparsityError(f"{len(calibration)} calibration samples do not split into batches of {batch_size}.")
    if config.method == "flap":
        new_model, head_map = _prune_structured(model, calibration, config, batch_size, mesh)
        return PruneResult(new_model, {}, head_map, None, time.perf_counter() - start)
    layer_specs = [config.spec] * model.config.num_layers
    if config.owl:
        layer_specs = _owl_specs(model, calibration, config, batch_size, mesh)
    masks = _prune_unstructured(model, calibration, config, layer_specs, batch_size, mesh)
    owl = np.array([s.ratio for s in layer_specs]) if config.owl else None
    result = PruneResult(model, masks, None, owl, time.perf_counter() - start)
    log.info("pruned with %s %s in %.1f s", config.method, config.sparsity, result.seconds)
    return result


def _stats_fns(config: PruneConfig):
    """init/update of the per-input-group statistics each method needs."""
    factory = WandaStats if config.method == "wanda" else HessianStats

    def init(layer):
        return {group: factory.init(layer[f"{group}.kernel"].shape[0]) for group in INPUT_GROUPS}

    def update(stats, inputs):
        return {group: s.update(inputs[group]) for group, s in stats.items()}

    return init, update


def _prune_unstructured(model, calibration, config, layer_specs, batch_size, mesh) -> Masks:
    states = CalibrationStates.embed(model, calibration, batch_size, mesh)
    init, update = _stats_fns(config)

    def prune_layer(index, params, stats):
        spec = layer_specs[index]
        new, keep = {}, {}
        for group, linears in INPUT_GROUPS.items():
            factor = hessian_factor(stats[group].hessian, config.percdamp) if config.method == "sparsegpt" else None
            for linear in linears:
                w = params[f"{linear}.kernel"]
                if factor is None:
                    keep[linear] = wanda_mask(w, stats[group].scaler_row, spec)
                    new[f"{linear}.kernel"] = jnp.where(keep[linear], w, jnp.zeros((), w.dtype))
                else:
                    w32 = _by_output_columns(w.astype(jnp.float32), mesh)
                    result = sparsegpt_prune_factored(w32, factor, spec, blocksize=config.blocksize)
                    keep[linear], new[f"{linear}.kernel"] = result.keep, result.weight.astype(w.dtype)
        return {**params, **new}, keep

    per_layer: list[dict[str, jax.Array]] = []
    for index, params, keep in iterate_layers(
        model, states, init_stats=init, update_stats=update, prune_layer=prune_layer, desc=config.method
    ):
        write_layer(model, index, {k: v for k, v in params.items() if k.endswith(".kernel")})
        per_layer.append(keep)
    return {f"layers.{linear}.kernel": jnp.stack([keep[linear] for keep in per_layer]) for linear in per_layer[0]}


def _by_output_columns(w: jax.Array, mesh: Mesh | None) -> jax.Array:
    """SparseGPT walks the input axis column by column; outputs are independent, so shard those only."""
    if mesh is None:
        return w
    axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    spec = PartitionSpec(None, axes) if axes and w.shape[1] % np.prod([mesh.shape[a] for a in axes]) == 0 else PartitionSpec()
    return jax.device_put(w, NamedSharding(mesh, spec))


def _owl_specs(model, calibration, config, batch_size, mesh) -> list[SparsitySpec]:
    """OWL: outlier ratios from the dense model's Wanda scores, layer by layer (no pruning in this pass)."""
    states = CalibrationStates.embed(model, calibration, batch_size, mesh)
    wanda = dataclasses.replace(config, method="wanda", owl=False)
    init, update = _stats_fns(wanda)

    def measure(index, params, stats):
        scores = [
            wanda_scores(params[f"{linear}.kernel"], stats[group].scaler_row)
            for group, linears in INPUT_GROUPS.items()
            for linear in linears
        ]
        return params, outlier_ratio(scores, config.owl_m)

    ratios = [r for _, _, r in iterate_layers(model, states, init_stats=init, update_stats=update, prune_layer=measure, desc="owl")]
    sparsities = owl_sparsities(ratios, config.spec.ratio, config.owl_lambda)
    log.info("OWL layer sparsities: %s", np.round(sparsities, 3).tolist())
    return [SparsitySpec(ratio=float(s)) for s in sparsities]


def _prune_structured(model, calibration, config, batch_size, mesh):
    plan = structured_plan(model.config, config.structured)
    states = CalibrationStates.embed(model, calibration, batch_size, mesh)
    hooks = driver_hooks(model.config, plan, model.dtype)
    results = [(params, heads, channels) for _, params, (heads, channels) in iterate_layers(model, states, desc="structured", **hooks)]
    return assemble_structured(model, results, mesh=mesh)
