"""LoRA, DoRA and sparsity-preserving (masked) LoRA on the stacked kernels, trained by the shared `fit`.

For every targeted kernel W (layers, in, out) the adapter holds A (layers, in, r) and B (layers, r, out),
ΔW = (alpha / r) · A @ B, and the step runs the model with

    LoRA         W' = W + ΔW
    masked LoRA  W' = W + keep ⊙ ΔW                          (pruned weights stay exactly zero)
    DoRA         W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_c               (m: (layers, out), trainable)

where ‖·‖_c is the L2 norm of each output column over the input axis: PEFT's
`torch.linalg.norm(weight, dim=1)` of the torch (out, in) weight is axis -2 of our (…, in, out) kernel.
As in PEFT (DoRA paper §4.3) the norm is detached: it follows ΔW in the forward pass but gets no
gradient. m starts at ‖W‖_c, so DoRA at init is the base model. Masking composes with DoRA
(m / ‖·‖_c scales whole columns, so zeros stay zeros). Unlike PEFT the norm is taken in fp32, and an
all-zero column keeps norm 1 instead of giving NaN.

`apply_lora` builds W' inside the jitted step (`kernels.with_kernels`) and calls the model as is.
That is x @ (W + s·A@B) = x @ W + s·(x @ A) @ B, PEFT's forward, up to rounding. What it costs:
every step materialises W' for each targeted kernel, all layers at once, and the backward pass holds
W''s cotangent of the same size: about two extra copies of the targeted weights in the compute dtype
(plus the fp32 ΔW), against PEFT's rank-r activations. The extra flops (2·in·out·r per kernel and
layer) are negligible next to the forward pass.
Rounding: with `compute_dtype="bfloat16"` W' is rounded to bf16 element by element, as a merged bf16
checkpoint is; an update much smaller than a weight's bf16 spacing is then invisible in the forward
pass (its gradient still flows). PEFT instead adds the low-rank path's output. Train in float32 for
PEFT's numerics.

Not implemented: LoRA dropout (the trainer draws no random numbers, so dropout is 0; Wanda's recipe
uses 0.05), rsLoRA, PiSSA-style inits, adapters on embeddings or lm_head.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcc_jax.baselines.kernels import TARGETS, target_name, with_kernels
from lcc_jax.sharding import flat_params
from lcc_jax.train import TrainConfig, TrainResult, fit

log = logging.getLogger(__name__)

ALL_PROJECTIONS: tuple[str, ...] = tuple(TARGETS)
LoraParams = dict[str, dict[str, jax.Array]]  # {"q": {"a": (L, in, r), "b": (L, r, out)[, "m": (L, out)]}}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """A LoRA-family adapter. Defaults: the Wanda paper's LoRA recipe (q and v, r = 8, alpha = 16)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")  # any of q, k, v, o, gate, up, down (or q_proj, ...)
    init: Literal["kaiming", "gaussian"] = "kaiming"  # PEFT init_lora_weights=True / "gaussian"
    dropout: float = 0.0  # only 0 is supported: the trainer draws no random numbers
    use_dora: bool = False
    masked: bool = False  # sparsity-preserving: W' = W + keep ⊙ ΔW

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be positive, not {self.rank}.")
        if self.dropout != 0.0:
            raise ValueError("LoRA dropout is not supported (the shared trainer is deterministic); use dropout=0.")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', not {self.init!r}.")
        names = tuple(target_name(t) for t in self.targets)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"targets must name distinct modules, not {self.targets!r}.")
        object.__setattr__(self, "targets", names)

    @property
    def scale(self) -> float:
        """alpha / r, PEFT's `scaling`."""
        return self.alpha / self.rank


WANDA_LORA = LoraConfig()  # Wanda (Sun et al. 2024) §5: q_proj, v_proj, r 8, alpha 16 (their dropout 0.05)
ALL_LORA = LoraConfig(targets=ALL_PROJECTIONS)
DORA = LoraConfig(targets=ALL_PROJECTIONS, use_dora=True)
MASKED_LORA = LoraConfig(targets=ALL_PROJECTIONS, masked=True)
PRESETS: dict[str, LoraConfig] = {"wanda": WANDA_LORA, "all": ALL_LORA, "dora": DORA, "masked": MASKED_LORA}


@functools.partial(jax.tree_util.register_dataclass, data_fields=("masks",), meta_fields=("scale", "masked"))
@dataclasses.dataclass(frozen=True)
class LoraSetup:
    """The frozen side of an adapter, passed to `fit(constants=...)`.

    masks: {target name: bool (layers, in, out), True = keep} when given explicitly. With `masked`
    and no masks, keep = (W != 0) is read from the frozen weights inside the step: the pruned zeros
    are the mask, and nothing mask-sized is replicated over a mesh (fit replicates constants).
    """

    masks: dict[str, jax.Array] | None
    scale: float
    masked: bool = False


def init_lora(
    model: nnx.Module, config: LoraConfig, key: jax.Array, masks: Mapping[str, jax.Array] | None = None
) -> tuple[LoraParams, LoraSetup]:
    """(trainable, setup) for `fit(model, trainable, apply_lora, ..., constants=setup)`.

    A ~ kaiming-uniform(a=√5) on the torch (r, in) weight, i.e. U(±1/√in) (or N(0, 1/r) with
    init="gaussian"), B = 0, DoRA's m = ‖W‖_c. `masks` ({param path or target name: keep}) implies
    masking; with `config.masked` and no masks, the weights' zeros are the mask.
    """
    flat = flat_params(model)
    trainable: LoraParams = {}
    for i, name in enumerate(config.targets):
        w = flat[TARGETS[name]][...]  # (layers, in, out)
        layers, d_in, d_out = w.shape
        ka = jax.random.fold_in(key, i)
        size = layers * d_in * config.rank  # drawn flat (same values, much faster to compile on CPU)
        if config.init == "kaiming":
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(ka, (size,), jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(ka, (size,), jnp.float32) / config.rank
        a = a.reshape(layers, d_in, config.rank)
        params = {"a": a, "b": jnp.zeros((layers, config.rank, d_out), jnp.float32)}
        if config.use_dora:
            params["m"] = column_norm(w.astype(jnp.float32))  # (layers, out)
        trainable[name] = params
    named = None
    if masks is not None:
        named = {target_name(k): jnp.asarray(v, bool) for k, v in masks.items()}
        named = {k: v for k, v in named.items() if k in trainable}
    setup = LoraSetup(masks=named, scale=config.scale, masked=config.masked or masks is not None)
    log.info("%s on %s, r=%d, alpha=%g%s: %d trainable parameters", "DoRA" if config.use_dora else "LoRA",
             ",".join(config.targets), config.rank, config.alpha, " (masked)" if setup.masked else "",
             num_trainable(trainable))
    return trainable, setup


def column_norm(w: jax.Array) -> jax.Array:
    """(..., in, out) -> (..., out): L2 norm of each output column over the input axis (PEFT's dim=1)."""
    return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=-2))


def lora_delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """(layers, in, out) fp32: scale · A @ B per layer."""
    return scale * jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32),
                              precision=jax.lax.Precision.HIGHEST)


def adapted_kernel(w: jax.Array, params: Mapping[str, jax.Array], scale: float,
                   keep: jax.Array | None = None) -> jax.Array:
    """W' (layers, in, out) fp32 for one target: LoRA, masked (keep given) and/or DoRA ("m" in params)."""
    delta = lora_delta(params["a"], params["b"], scale)
    if keep is not None:
        delta = jnp.where(keep, delta, 0.0)
    adapted = w.astype(jnp.float32) + delta
    if "m" in params:
        norm = jax.lax.stop_gradient(column_norm(adapted))  # detached, as PEFT (DoRA §4.3)
        norm = jnp.where(norm == 0, 1.0, norm)  # an all-zero column stays zero (PEFT would give NaN)
        adapted = adapted * (params["m"].astype(jnp.float32) / norm)[..., None, :]
    return adapted


def adapted_kernels(weights: Mapping[str, jax.Array], trainable: LoraParams, setup: LoraSetup) -> dict[str, jax.Array]:
    """{param path: W'} from {param path: W} (at least the targeted kernels), in each kernel's own dtype."""
    out = {}
    for name, params in trainable.items():
        path = TARGETS[name]
        w = weights[path]
        out[path] = adapted_kernel(w, params, setup.scale, _keep(name, w, setup)).astype(w.dtype)
    return out


def apply_lora(model, trainable: LoraParams, tokens, mask, *, constants: LoraSetup, remat: bool = False):
    """The `fit` apply_fn of LoRA, DoRA and masked LoRA: (batch, seq, vocab) logits with W' in place of W."""
    kernels = adapted_kernels(target_weights(model, trainable), trainable, constants)
    return with_kernels(model, kernels)(tokens, mask, remat=remat).logits


def target_weights(model: nnx.Module, trainable: LoraParams) -> dict[str, jax.Array]:
    """{param path: W} of the kernels `trainable` adapts."""
    flat = flat_params(model)
    return {TARGETS[name]: flat[TARGETS[name]][...] for name in trainable}


def num_trainable(trainable: Any) -> int:
    """Parameters the optimizer updates: r·(in + out) per kernel and layer for LoRA, + out for DoRA."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))


def _keep(name: str, w: jax.Array, setup: LoraSetup) -> jax.Array | None:
    if setup.masks is not None and name in setup.masks:
        return setup.masks[name]
    return (w != 0) if setup.masked else None


@dataclasses.dataclass(frozen=True)
class LoraResult:
    trainable: LoraParams  # fp32 A, B (and m): merge with merge.merge_lora(model, trainable, setup)
    setup: LoraSetup
    train: TrainResult


def train_lora(model: nnx.Module, train_batches_fn, train_config: TrainConfig, config: LoraConfig, key: jax.Array,
               *, masks: Mapping[str, jax.Array] | None = None, **fit_kwargs: Any) -> LoraResult:
    """Initialise the adapter and train it with the shared trainer (`fit_kwargs`: valid_batches, mesh, ...)."""
    trainable, setup = init_lora(model, config, key, masks)
    result = fit(model, trainable, apply_lora, train_batches_fn, train_config, constants=setup, **fit_kwargs)
    return LoraResult(trainable=result.trainable, setup=setup, train=result)
