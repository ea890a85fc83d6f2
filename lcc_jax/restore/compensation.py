"""Compensation on the top-k heads: δ_h = V_hᵀ β_h + b_h, added to head h's o_proj input at every token.

As the reference (`models/modeling_llama.py`, LlamaAttention): per head a frozen `main_comp` (d, d)
whose rows are the lost directions (the rows of Vᵀ), a magnitude vector `attn_v` (β) and a bias
`attn_b` (b), combined as `bmm(main_comp.transpose(1, 2), attn_v[..., None])`, i.e.
δ = main_compᵀ β + b = Σ_i β_i · main_comp[i] + b. β and b of the selected heads start at N(0, 1e-3);
every other head adds nothing. Its trainable count is k · 2d.

`Compensation` is a pytree; `split_trainable` gives the optimizer only β and b (as the `mode` allows),
`to_dense` scatters δ into the model's (layers, heads, head_dim) compensation door; `lowest_layer` is where
training's backward pass can stop.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from lcc_jax.config import ModelConfig
from lcc_jax.restore.top_k import TopK

log = logging.getLogger(__name__)

Mode = Literal["full", "bias_only", "no_bias"]
MODES: tuple[str, ...] = ("full", "bias_only", "no_bias")
_TRAINABLE = {"full": ("beta", "bias"), "bias_only": ("bias",), "no_bias": ("beta",)}


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=("basis", "beta", "bias", "heads"), meta_fields=("mode",)
)
@dataclasses.dataclass(frozen=True)
class Compensation:
    """Lost-component compensation of k heads (index l·H + h)."""

    basis: jax.Array  # (k, d, d) frozen: rows are directions (V_hᵀ's rows), unit or zero
    beta: jax.Array  # (k, d): magnitudes along the basis rows
    bias: jax.Array  # (k, d)
    heads: jax.Array  # (k,) int32
    mode: str = "full"

    @property
    def num_heads(self) -> int:
        return int(self.heads.shape[0])

    def delta(self) -> jax.Array:
        """(k, d) δ = basisᵀ β + b per selected head."""
        return head_delta(self.basis, self.beta, self.bias)


def head_delta(basis: jax.Array, beta: jax.Array, bias: jax.Array) -> jax.Array:
    """(k, d): Σ_i β[k, i] · basis[k, i, :] + bias[k]."""
    return jnp.einsum("ki,kid->kd", beta, basis.astype(beta.dtype), precision=jax.lax.Precision.HIGHEST) + bias


def init_compensation(
    basis_all: np.ndarray,  # (L·H, d, d) from components.lost_components
    head_ranking: np.ndarray,  # (L·H,) head indices, best first
    top_k: TopK | int | float | str,
    key: jax.Array,
    *,
    std: float = 1e-3,
    mode: Mode = "full",
    random_heads: bool = False,
) -> Compensation:
    """Compensation on the `top_k` best heads (a `TopK`: a count, or a fraction of all heads), β and b ~ N(0, std).

    `mode`: "full" trains β and b; "bias_only" keeps β = 0 (δ = b); "no_bias" keeps b = 0 (δ = Vᵀβ).
    `random_heads` picks k heads uniformly at random (with `key`) instead of the best: the ablation.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}.")
    total, d, _ = basis_all.shape
    k = TopK.parse(top_k).resolve(total)
    select_key, beta_key, bias_key = jax.random.split(key, 3)
    if random_heads:
        heads = np.sort(np.asarray(jax.random.choice(select_key, total, (k,), replace=False)))
    else:
        ranking = np.asarray(head_ranking)
        if sorted(ranking.tolist()) != list(range(total)):
            raise ValueError(f"head_ranking must be a permutation of the {total} head indices.")
        heads = ranking[:k]
    heads = jnp.asarray(heads, jnp.int32)
    beta = std * jax.random.normal(beta_key, (k, d), jnp.float32)
    bias = std * jax.random.normal(bias_key, (k, d), jnp.float32)
    if mode == "bias_only":
        beta = jnp.zeros_like(beta)
    if mode == "no_bias":
        bias = jnp.zeros_like(bias)
    comp = Compensation(basis=jnp.asarray(np.asarray(basis_all)[np.asarray(heads)], jnp.float32), beta=beta,
                        bias=bias, heads=heads, mode=mode)
    log.info("compensation on %d of %d heads (%s%s): %d trainable parameters", k, total, mode,
             ", random heads" if random_heads else "", num_trainable(comp))
    return comp


def restrict_span(comp: Compensation, k: int) -> Compensation:
    """δ_h = Σ_{i<k} β_i v_i only: the span of each head's top-k lost directions, no bias (mode "no_bias").

    The paper's idea taken literally. With N probing samples ≥ head_dim the full basis spans every
    direction, so the unrestricted δ = Vᵀβ + b is a free vector per head; this keeps it in the lost subspace.
    """
    d = comp.basis.shape[-1]
    if not 1 <= k <= d:
        raise ValueError(f"a restricted span needs 1 <= k <= head_dim ({d}), not {k}.")
    keep = (jnp.arange(d) < k).astype(jnp.float32)  # (d,)
    return dataclasses.replace(comp, basis=comp.basis * keep[None, :, None], beta=comp.beta * keep[None, :],
                               bias=jnp.zeros_like(comp.bias), mode="no_bias")


def split_trainable(comp: Compensation) -> tuple[dict[str, jax.Array], Compensation]:
    """({"beta", "bias"} as the mode trains them, the rest): what the optimizer sees, and what it must not."""
    names = _TRAINABLE[comp.mode]
    trainable = {name: getattr(comp, name) for name in names}
    frozen = dataclasses.replace(comp, **{name: None for name in names})
    return trainable, frozen


def merge_trainable(trainable: dict[str, jax.Array], frozen: Compensation) -> Compensation:
    """The inverse of `split_trainable`."""
    return dataclasses.replace(frozen, **trainable)


def to_dense(trainable: dict[str, jax.Array], frozen: Compensation, config: ModelConfig) -> jax.Array:
    """(layers, heads, head_dim): δ on the selected heads, zero elsewhere; differentiable in `trainable`."""
    comp = merge_trainable(trainable, frozen)
    shape = (config.num_layers, config.num_heads, config.head_dim)
    if comp.basis.shape[1:] != (config.head_dim, config.head_dim):
        raise ValueError(f"compensation basis {comp.basis.shape} does not fit head_dim {config.head_dim}.")
    if not isinstance(comp.heads, jax.core.Tracer):
        check_heads(comp, config)
    delta = comp.delta()  # (k, d)
    flat = jnp.zeros((config.total_heads, config.head_dim), delta.dtype).at[comp.heads].set(delta)
    return flat.reshape(shape)


def dense_compensation(comp: Compensation, config: ModelConfig) -> jax.Array:
    """`to_dense` of a whole Compensation."""
    return to_dense(*split_trainable(comp), config)


def num_trainable(comp: Compensation) -> int:
    """Trainable parameters: k·2d in "full" mode (the reference's count), k·d otherwise."""
    return sum(int(np.prod(v.shape)) for v in split_trainable(comp)[0].values())


def lowest_layer(comp: Compensation, config: ModelConfig) -> int:
    """The lowest layer holding one of `comp`'s heads (`num_layers` when it has none): the train step's
    backward pass stops there (`fit(stop_backward_at=...)`), since nothing below it trains."""
    heads = np.asarray(comp.heads)
    return int(heads.min()) // config.num_heads if heads.size else config.num_layers


def check_heads(comp: Compensation, config: ModelConfig) -> None:
    """Raise unless every selected head exists in `config` (e.g. after structured pruning)."""
    heads = np.asarray(comp.heads)
    if heads.size and (heads.min() < 0 or heads.max() >= config.total_heads):
        raise ValueError(f"compensation heads reach {heads.max()}, but the model has {config.total_heads} heads.")
