"""Pruning masks: which kernels are prunable, mask builders, applying and recovering masks.

A mask set is a flat dict {nnx param path: bool array of the kernel's shape}, **True = KEEP**
(False = pruned, the weight is an exact zero). Only the decoder's linear kernels are prunable
(`PRUNABLE`); embeddings, norms, biases and lm_head never are. Kernels are stacked
(layers, in, out), and every builder here works on (..., in, out): thresholds and N:M groups are
per matrix, i.e. per layer. N:M groups run along the input axis (axis -2), per output column.

Masks live with the sharding of the weight they mirror (`apply_masks`, `masks_from_zeros` and the
builders place their results like their inputs; use `lcc_jax.sharding.shard_like` otherwise).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from lcc_jax.pruning.patterns import SparsityError, SparsitySpec
from lcc_jax.sharding import flat_params, shard_like

Masks = dict[str, jax.Array]  # {path: bool (layers, in, out)}, True = keep

PRUNABLE: tuple[str, ...] = (
    "layers.attn.q_proj.kernel",
    "layers.attn.k_proj.kernel",
    "layers.attn.v_proj.kernel",
    "layers.attn.o_proj.kernel",
    "layers.mlp.gate_proj.kernel",
    "layers.mlp.up_proj.kernel",
    "layers.mlp.down_proj.kernel",
)


def prunable_paths(model) -> list[str]:
    """The prunable kernel paths present in `model` (a module, a State, or a {path: array} dict), in PRUNABLE order."""
    flat = model if isinstance(model, Mapping) and not isinstance(model, nnx.State) else flat_params(model)
    return [p for p in PRUNABLE if p in flat]


# ---------------------------------------------------------------------------------------------
# builders: scores (..., in, out) -> keep mask (..., in, out); low scores are pruned


def _per_matrix(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """Apply a (in, out) -> (in, out) function to every matrix of a (..., in, out) array."""
    for _ in range(x.ndim - 2):
        fn = jax.vmap(fn)
    return fn(x)


def place_like(out: jax.Array, ref) -> jax.Array:
    """`out` with the NamedSharding of `ref` (a no-op for unsharded / single-device `ref`)."""
    sharding = getattr(ref, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.device_put(out, sharding)
    return out


def _check_matrix(scores, what: str) -> None:
    if scores.ndim < 2:
        raise SparsityError(f"{what} needs a (..., in, out) array, got shape {tuple(scores.shape)}.")


@partial(jax.jit, static_argnames=("per_output",))
def _unstructured_keep(scores: jax.Array, k: jax.Array, per_output: bool) -> jax.Array:
    """k (traced, so per-layer ratios share one compile): the sorted position of the cut."""

    def global_threshold(s):  # (in, out): one threshold, prune s <= sorted(s)[k]
        return s > jnp.sort(s.ravel())[k]

    def per_column(s):  # (in, out): in each output column prune the k lowest, in stable-sort order
        order = jnp.argsort(s, axis=0, stable=True)  # (in, out)
        position = jnp.broadcast_to(jnp.arange(s.shape[0], dtype=jnp.int32)[:, None], s.shape)
        rank = jnp.put_along_axis(jnp.zeros(s.shape, jnp.int32), order, position, axis=0, inplace=False)
        return rank >= k

    return _per_matrix(per_column if per_output else global_threshold, scores)


def unstructured_mask(scores: jax.Array, ratio: float, per_output: bool) -> jax.Array:
    """Keep mask pruning a `ratio` of each (in, out) matrix by lowest score.

    per_output=True (Wanda): in every output column, prune exactly int(in * ratio) lowest scores,
    ties broken by a stable sort (lower input index pruned first).
    per_output=False (magnitude): one threshold per matrix, t = sorted(scores)[int(numel * ratio)],
    prune every score <= t (ties at t are all pruned, as in the Wanda repo's prune_magnitude).
    ratio == 0 keeps everything (the reference's `<=` rule would still prune the minimum).
    """
    _check_matrix(scores, "unstructured_mask")
    ratio = SparsitySpec(ratio=ratio).ratio
    if ratio == 0.0:
        return place_like(jnp.ones(scores.shape, bool), scores)
    d_in, d_out = scores.shape[-2:]
    k = int(d_in * ratio) if per_output else int(d_in * d_out * ratio)
    return place_like(_unstructured_keep(scores, jnp.int32(k), bool(per_output)), scores)


@partial(jax.jit, static_argnames=("n", "m"))
def _nm_keep(scores: jax.Array, n: int, m: int) -> jax.Array:
    def one(s):  # (in, out)
        groups = s.reshape(s.shape[0] // m, m, s.shape[1])  # (in/m, m, out)
        lowest = jnp.argsort(groups, axis=1, stable=True)[:, :n]  # (in/m, n, out)
        pruned = jnp.put_along_axis(jnp.zeros(groups.shape, bool), lowest, True, axis=1, inplace=False)
        return ~pruned.reshape(s.shape)

    return _per_matrix(one, scores)


def nm_mask(scores: jax.Array, n: int, m: int) -> jax.Array:
    """Keep mask pruning the n lowest scores in each group of m consecutive inputs, per output.

    Ties go to the lower input index (stable sort); the reference's torch.topk leaves them unspecified.
    """
    _check_matrix(scores, "nm_mask")
    spec = SparsitySpec(n=n, m=m)
    spec.check_input_dim(scores.shape[-2], "nm_mask scores")
    return place_like(_nm_keep(scores, spec.n, spec.m), scores)


def mask_for_spec(scores: jax.Array, spec: SparsitySpec | str, per_output: bool) -> jax.Array:
    """`nm_mask` for an N:M spec, else `unstructured_mask(scores, spec.ratio, per_output)`."""
    spec = SparsitySpec.parse(spec)
    if spec.is_nm:
        return nm_mask(scores, spec.n, spec.m)
    return unstructured_mask(scores, spec.ratio, per_output)


# ---------------------------------------------------------------------------------------------
# masks <-> model


def check_masks(masks: Mapping[str, jax.Array], model) -> None:
    """Raise unless every mask names a prunable kernel of `model`, with its shape, as bool."""
    flat = flat_params(model)
    problems = []
    for path, keep in masks.items():
        if path not in PRUNABLE:
            problems.append(f"{path}: not a prunable kernel (prunable: {', '.join(PRUNABLE)})")
        elif path not in flat:
            problems.append(f"{path}: the model has no such parameter")
        elif tuple(keep.shape) != tuple(flat[path].shape):
            problems.append(f"{path}: mask shape {tuple(keep.shape)} != kernel shape {tuple(flat[path].shape)}")
        elif keep.dtype != jnp.bool_:
            problems.append(f"{path}: mask dtype {keep.dtype}, expected bool (True = keep)")
    if problems:
        raise SparsityError("bad masks:\n  " + "\n  ".join(problems))


@jax.jit
def _zero_pruned(w: jax.Array, keep: jax.Array) -> jax.Array:
    return jnp.where(keep, w, jnp.zeros((), w.dtype))


def apply_masks(model: nnx.Module, masks: Mapping[str, jax.Array]) -> nnx.Module:
    """Write exact zeros where masks are False, in place, keeping each kernel's sharding; returns the model."""
    check_masks(masks, model)
    flat = flat_params(model)
    placed = shard_like(dict(masks), model)
    for path, keep in placed.items():
        w = flat[path][...]
        flat[path][...] = place_like(_zero_pruned(w, keep), w)
    return model


@jax.jit
def _nonzero(w: jax.Array) -> jax.Array:
    return w != 0


def masks_from_zeros(model, paths: Iterable[str] | None = None) -> Masks:
    """Masks of a model pruned elsewhere: keep = (weight != 0), for the prunable kernels, sharded like them."""
    flat = flat_params(model)
    paths = prunable_paths(flat) if paths is None else list(paths)
    out = {}
    for path in paths:
        w = flat[path][...]
        out[path] = place_like(_nonzero(w), w)
    return out


# ---------------------------------------------------------------------------------------------
# sparsity audit


@dataclasses.dataclass(frozen=True)
class MatrixSparsity:
    """Zeros in one layer's kernel; nm_ok: every N:M group has >= N zeros (None when no N:M pattern)."""

    path: str
    layer: int
    zeros: int
    size: int
    nm_ok: bool | None = None

    @property
    def name(self) -> str:
        return self.path.split(".")[-2]  # 'q_proj'

    @property
    def sparsity(self) -> float:
        return self.zeros / self.size


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    """Per-matrix, per-layer and total sparsity of the prunable kernels, with an optional N:M audit."""

    matrices: tuple[MatrixSparsity, ...]
    pattern: SparsitySpec | None = None

    @property
    def per_layer(self) -> dict[int, float]:
        zeros: dict[int, int] = {}
        size: dict[int, int] = {}
        for m in self.matrices:
            zeros[m.layer] = zeros.get(m.layer, 0) + m.zeros
            size[m.layer] = size.get(m.layer, 0) + m.size
        return {layer: zeros[layer] / size[layer] for layer in sorted(zeros)}

    @property
    def per_matrix(self) -> dict[tuple[str, int], float]:
        return {(m.path, m.layer): m.sparsity for m in self.matrices}

    @property
    def total(self) -> float:
        size = sum(m.size for m in self.matrices)
        return sum(m.zeros for m in self.matrices) / size if size else 0.0

    @property
    def nm_failures(self) -> list[tuple[str, int]]:
        return [(m.path, m.layer) for m in self.matrices if m.nm_ok is False]

    @property
    def nm_valid(self) -> bool | None:
        """True when every group of M inputs holds >= N zeros in every matrix; None without an N:M pattern."""
        if self.pattern is None or not self.pattern.is_nm:
            return None
        return not self.nm_failures

    def to_markdown(self) -> str:
        names = list(dict.fromkeys(m.name for m in self.matrices))
        cell = {(m.layer, m.name): m for m in self.matrices}
        lines = ["| layer | " + " | ".join(names) + " | layer |", "|---" * (len(names) + 2) + "|"]
        for layer, sparsity in self.per_layer.items():
            row = [f"{100 * cell[layer, n].sparsity:.2f}%" if (layer, n) in cell else "" for n in names]
            lines.append(f"| {layer} | " + " | ".join(row) + f" | {100 * sparsity:.2f}% |")
        totals = []
        for n in names:
            ms = [m for m in self.matrices if m.name == n]
            totals.append(f"{100 * sum(m.zeros for m in ms) / sum(m.size for m in ms):.2f}%")
        lines.append("| **all** | " + " | ".join(totals) + f" | **{100 * self.total:.2f}%** |")
        if self.nm_valid is not None:
            if self.nm_valid:
                lines.append(f"\nN:M {self.pattern.n}:{self.pattern.m}: valid in all {len(self.matrices)} matrices.")
            else:
                bad = ", ".join(f"{p} layer {i}" for p, i in self.nm_failures)
                lines.append(f"\nN:M {self.pattern.n}:{self.pattern.m}: **INVALID** in {bad}.")
        return "\n".join(lines)


@partial(jax.jit, static_argnames=("m",))
def _audit(pruned: jax.Array, n: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """pruned (layers, in, out) -> zeros per layer (layers,), N:M ok per layer (layers,)."""
    zeros = jnp.sum(pruned, axis=(1, 2), dtype=jnp.int32)
    if m == 0:
        return zeros, jnp.ones(zeros.shape, bool)
    layers, d_in, d_out = pruned.shape
    per_group = jnp.sum(pruned.reshape(layers, d_in // m, m, d_out), axis=2, dtype=jnp.int32)
    return zeros, jnp.all(per_group >= n, axis=(1, 2))


def sparsity_report(model_or_masks, pattern: SparsitySpec | str | None = None) -> SparsityReport:
    """Audit a model (zeros of its prunable kernels), a mask set (False = pruned) or a {path: weights} dict.

    With an N:M `pattern`, also checks that every group of M consecutive inputs has at least N zeros.
    """
    pattern = None if pattern is None else SparsitySpec.parse(pattern)
    if isinstance(model_or_masks, Mapping) and not isinstance(model_or_masks, nnx.State):
        arrays = dict(model_or_masks)
    else:
        flat = flat_params(model_or_masks)
        arrays = {p: flat[p][...] for p in prunable_paths(flat)}
    matrices = []
    for path, a in arrays.items():
        a = a if a.ndim == 3 else a.reshape((-1, *a.shape[-2:]))
        pruned = ~a if a.dtype == jnp.bool_ else a == 0
        d_in = a.shape[-2]
        n, m = (pattern.n, pattern.m) if pattern is not None and pattern.is_nm else (0, 0)
        fits = m == 0 or d_in % m == 0
        zeros, ok = _audit(pruned, jnp.int32(n), m if fits else 0)
        size = d_in * a.shape[-1]
        for layer, (z, good) in enumerate(zip(jax.device_get(zeros).tolist(), jax.device_get(ok).tolist())):
            nm_ok = None if m == 0 else (bool(good) and fits)
            matrices.append(MatrixSparsity(path, layer, int(z), size, nm_ok))
    return SparsityReport(tuple(matrices), pattern)
