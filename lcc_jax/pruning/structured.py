"""Structured pruning that physically shrinks the model: whole KV groups of heads and MLP channels.

FLAP-style (An et al., AAAI 2024) with its uniform "UL-UM" structure: layers are stacked and
scanned, so every layer keeps the same shape, i.e. removes the same number of KV groups (a KV head
with its queries_per_kv query heads) and of MLP channels. Within a layer, units are ranked by their
fluctuation score (`structured_scores`); the removed units' mean contribution is added to the output
bias (o_proj for heads, down_proj for channels), which is exact for a channel that is constant over
the calibration tokens. No other weight is updated (SlimGPT's OBS updates and its non-uniform
per-layer ratios are not used: the latter cannot keep layers the same shape).

Driver wiring: `sequential.iterate_layers(model, states, **driver_hooks(config, plan, dtype))`
yields (layer, params, (kept_heads, kept_channels)); pass those as (params, kept_heads,
kept_channels) triples to `assemble_structured`. plan = structured_plan(config, ratio).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lcc_jax.config import ModelConfig
from lcc_jax.errors import UserError
from lcc_jax.models.llama import CausalLM, DecoderLayer
from lcc_jax.pruning.structured_scores import (
    ChannelStats,
    channel_scores,
    group_scores,
    head_scores,
    top_indices,
)
from lcc_jax.sharding import flat_params, shard_model

_HIGHEST = jax.lax.Precision.HIGHEST
LayerParams = dict[str, jax.Array]  # {"attn.q_proj.kernel": (in, out), ...}: one layer, no layers axis

# Every per-layer parameter and how pruning cuts it: (axis, unit) or None for untouched.
_CUTS: dict[str, tuple[int, str] | None] = {
    "attn.q_proj.kernel": (1, "q"),  # (embed, heads*head_dim)
    "attn.q_proj.bias": (0, "q"),
    "attn.k_proj.kernel": (1, "kv"),  # (embed, kv_heads*head_dim)
    "attn.k_proj.bias": (0, "kv"),
    "attn.v_proj.kernel": (1, "kv"),
    "attn.v_proj.bias": (0, "kv"),
    "attn.o_proj.kernel": (0, "q"),  # (heads*head_dim, embed)
    "attn.o_proj.bias": None,  # compensated, not cut
    "attn.q_norm.scale": None,
    "attn.k_norm.scale": None,
    "mlp.gate_proj.kernel": (1, "mlp"),  # (embed, inter)
    "mlp.gate_proj.bias": (0, "mlp"),
    "mlp.up_proj.kernel": (1, "mlp"),
    "mlp.up_proj.bias": (0, "mlp"),
    "mlp.down_proj.kernel": (0, "mlp"),  # (inter, embed)
    "mlp.down_proj.bias": None,  # compensated, not cut
    "input_norm.scale": None,
    "post_attn_norm.scale": None,
}


class StructuredPruneError(UserError):
    """A structured-pruning request that cannot be met."""


class StructuredPlan(NamedTuple):
    """What every layer keeps."""

    keep_kv_groups: int
    keep_channels: int


# ----------------------------------------------------------------------------- plan and config


def unit_params(config: ModelConfig) -> tuple[int, int, int]:
    """(weights per KV group, weights per MLP channel, prunable weights per layer); biases not counted.

    A KV group is queries_per_kv q heads + one k and one v head + their o_proj rows:
    embed·head_dim·(2·queries_per_kv + 2). An MLP channel is a gate and an up column and a down row: 3·embed.
    """
    c = config
    group = c.hidden_size * c.head_dim * (2 * c.queries_per_kv + 2)
    channel = 3 * c.hidden_size
    return group, channel, c.num_kv_heads * group + c.intermediate_size * channel


def structured_plan(config: ModelConfig, ratio: float) -> StructuredPlan:
    """Turn a ratio of each layer's prunable (attention + MLP) weights into kept KV groups and channels.

    removed groups   = round(ratio · kv_heads)                     (half rounds up)
    removed channels = round((ratio · P − removed groups · G) / C)  (at least 0)
    with P, G, C from `unit_params`: attention is pruned at the ratio as closely as whole groups
    allow, and the MLP takes the rest, so the total is within half a channel of ratio · P (unless
    the attention share alone overshoots it, where no channel is removed).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating, np.integer)):
        raise StructuredPruneError(f"structured ratio must be a number in [0, 1), got {ratio!r}.")
    if not 0.0 <= float(ratio) < 1.0:
        raise StructuredPruneError(f"structured ratio must be in [0, 1), got {ratio}.")
    c = config
    group, channel, total = unit_params(c)
    remove_groups = math.floor(ratio * c.num_kv_heads + 0.5)
    if remove_groups >= c.num_kv_heads:
        raise StructuredPruneError(
            f"ratio {ratio} removes {remove_groups} of {c.num_kv_heads} KV groups per layer and leaves none; "
            f"use a ratio below {(c.num_kv_heads - 0.5) / c.num_kv_heads:.3f}."
        )
    remove_channels = max(0, math.floor((ratio * total - remove_groups * group) / channel + 0.5))
    if remove_channels >= c.intermediate_size:
        raise StructuredPruneError(
            f"ratio {ratio} needs {remove_channels} of {c.intermediate_size} MLP channels per layer after "
            f"removing {remove_groups} KV groups, leaving none; use a smaller ratio."
        )
    return StructuredPlan(c.num_kv_heads - remove_groups, c.intermediate_size - remove_channels)


def removed_fraction(config: ModelConfig, plan: StructuredPlan) -> float:
    """The fraction of prunable weights that `plan` actually removes (to report next to the ratio)."""
    group, channel, total = unit_params(config)
    groups = config.num_kv_heads - plan.keep_kv_groups
    channels = config.intermediate_size - plan.keep_channels
    return (groups * group + channels * channel) / total


def _check_plan(config: ModelConfig, keep_kv_groups: int, keep_channels: int) -> None:
    if not 1 <= int(keep_kv_groups) <= config.num_kv_heads:
        raise StructuredPruneError(f"keep_kv_groups={keep_kv_groups} must be in [1, {config.num_kv_heads}].")
    if not 1 <= int(keep_channels) <= config.intermediate_size:
        raise StructuredPruneError(f"keep_channels={keep_channels} must be in [1, {config.intermediate_size}].")


def shrunk_config(config: ModelConfig, plan: StructuredPlan) -> ModelConfig:
    """The config of the shrunken model: fewer heads / channels, and o_proj and down_proj biases.

    transformers has one switch for q/k/v/o biases (Llama's attention_bias) and one for
    gate/up/down (mlp_bias), so: llama gets zero q/k/v biases too; Qwen2 (q/k/v bias, no o bias)
    and Mistral without a sliding window become model_type "llama" (same computation) so they
    export. Not exportable to transformers (runs in lcc_jax only): Qwen3 (its MLP has no bias) and
    Mistral with a sliding window (transformers Mistral has no biases). transformers 5's
    LlamaConfig also refuses hidden_size % num_heads != 0 (head_dim notwithstanding), so e.g.
    LLaMA-7B with 26 of 32 heads exports weights that transformers 5 cannot reload by config.
    """
    _check_plan(config, *plan)
    new = config.replace(
        num_heads=plan.keep_kv_groups * config.queries_per_kv,
        num_kv_heads=plan.keep_kv_groups,
        intermediate_size=plan.keep_channels,
        o_bias=True,
        mlp_bias=True,
    )
    if config.model_type in ("llama", "qwen3"):
        return new.replace(qkv_bias=True)
    if config.model_type == "qwen2" or (config.model_type == "mistral" and config.sliding_window is None):
        return new.replace(model_type="llama", qkv_bias=True)
    return new  # mistral with a sliding window


# ----------------------------------------------------------------------------- statistics for the driver


def structured_stats_init(config: ModelConfig) -> dict[str, ChannelStats]:
    """Empty statistics for the two inputs structured pruning reads: o_proj's (heads) and down_proj's."""
    return {
        "attn.o_proj": ChannelStats.init(config.num_heads * config.head_dim),
        "mlp.down_proj": ChannelStats.init(config.intermediate_size),
    }


def structured_stats_update(
    stats: Mapping[str, ChannelStats], inputs: Mapping[str, jax.Array], mask: jax.Array | None = None
) -> dict[str, ChannelStats]:
    """Add one batch of DecoderLayer.linear_inputs; mask (batch, seq), 1 = real token (None: all)."""
    return {name: s.update(inputs[name], mask) for name, s in stats.items()}


# ----------------------------------------------------------------------------- one layer


def structured_prune_layer(
    layer_params: Mapping[str, jax.Array],
    head_stats: ChannelStats,
    mlp_stats: ChannelStats,
    keep_kv_groups: int,
    keep_channels: int,
    *,
    config: ModelConfig,
    compensate: bool = True,
) -> tuple[LayerParams, np.ndarray, np.ndarray]:
    """Prune one layer (of the dense `config`) to its best KV groups and MLP channels.

    Returns (params of the shrunken layer, complete for `shrunk_config`; kept query heads (H',) as
    dense indices in ascending order; kept channels (keep_channels,) ascending). With `compensate`,
    o_proj's bias gets Σ_removed mean_j · W_o[j, :] and down_proj's likewise (FLAP's bias
    compensation). Biases the shrunken config has but the layer lacks start at zero.
    """
    c = config
    _check_plan(c, keep_kv_groups, keep_channels)
    unknown = sorted(set(layer_params) - set(_CUTS))
    if unknown:
        raise StructuredPruneError(f"unknown layer parameter(s) {unknown}; structured pruning knows {sorted(_CUTS)}.")
    q, d = c.queries_per_kv, c.head_dim
    o_kernel = layer_params["attn.o_proj.kernel"]  # (heads*head_dim, embed)
    down = layer_params["mlp.down_proj.kernel"]  # (inter, embed)
    if head_stats.mean.shape != (c.num_heads * d,) or mlp_stats.mean.shape != (c.intermediate_size,):
        raise StructuredPruneError(
            f"statistics have {head_stats.mean.shape[0]} head and {mlp_stats.mean.shape[0]} MLP channels; "
            f"the layer has {c.num_heads * d} and {c.intermediate_size}."
        )

    group_score = group_scores(head_scores(head_stats, o_kernel, c.num_heads), c.num_kv_heads)  # (kv_heads,)
    groups = top_indices(group_score, int(keep_kv_groups))
    kept_heads = (groups[:, None] * q + np.arange(q)).reshape(-1)  # (H',)
    kept_channels = top_indices(channel_scores(mlp_stats, down), int(keep_channels))
    index = {
        "q": (kept_heads[:, None] * d + np.arange(d)).reshape(-1),
        "kv": (groups[:, None] * d + np.arange(d)).reshape(-1),
        "mlp": kept_channels,
    }

    out: LayerParams = {}
    for name, value in layer_params.items():
        cut = _CUTS[name]
        out[name] = value if cut is None else jnp.take(value, jnp.asarray(index[cut[1]]), axis=cut[0])
    out["attn.o_proj.bias"] = _compensated_bias(layer_params, "attn.o_proj", head_stats, index["q"], compensate)
    out["mlp.down_proj.bias"] = _compensated_bias(layer_params, "mlp.down_proj", mlp_stats, kept_channels, compensate)
    zero_biases = ["mlp.gate_proj", "mlp.up_proj"]  # mlp_bias switches gate, up and down together
    if shrunk_config(c, StructuredPlan(keep_kv_groups, keep_channels)).qkv_bias:
        zero_biases += ["attn.q_proj", "attn.k_proj", "attn.v_proj"]
    for linear in zero_biases:
        kernel = out[f"{linear}.kernel"]
        out.setdefault(f"{linear}.bias", jnp.zeros(kernel.shape[1:], kernel.dtype))
    return out, kept_heads, kept_channels


def _compensated_bias(params, linear: str, stats: ChannelStats, kept: np.ndarray, compensate: bool) -> jax.Array:
    """The linear's bias (or zeros) plus the removed inputs' mean contribution: (out,)."""
    kernel = params[f"{linear}.kernel"]  # (in, out)
    bias = params.get(f"{linear}.bias")
    bias = jnp.zeros(kernel.shape[1:], jnp.float32) if bias is None else bias.astype(jnp.float32)
    if compensate:
        removed = np.ones(kernel.shape[0], bool)
        removed[kept] = False
        mean_removed = jnp.where(jnp.asarray(removed), stats.mean, 0.0)  # (in,)
        bias = bias + jnp.dot(mean_removed, kernel.astype(jnp.float32), precision=_HIGHEST)
    return bias.astype(kernel.dtype)


def driver_hooks(
    config: ModelConfig, plan: StructuredPlan, dtype=jnp.float32, attention_impl=None, *, compensate: bool = True
) -> dict:
    """Keyword arguments for `sequential.iterate_layers`: init_stats, update_stats, prune_layer, layer_template.

    prune_layer returns (params, (kept_heads, kept_channels)); statistics use every token (the
    driver's calibration batches carry no padding).
    """

    def prune_layer(index: int, params: LayerParams, stats: dict[str, ChannelStats]):
        new, heads, channels = structured_prune_layer(
            params, stats["attn.o_proj"], stats["mlp.down_proj"], *plan, config=config, compensate=compensate
        )
        return new, (heads, channels)

    return dict(
        init_stats=lambda params: structured_stats_init(config),
        update_stats=structured_stats_update,
        prune_layer=prune_layer,
        layer_template=structured_layer_template(shrunk_config(config, plan), dtype, attention_impl),
    )


def structured_layer_template(
    config: ModelConfig, dtype=jnp.float32, attention_impl=None
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state) of one layer of the shrunken `config`: the driver's `layer_template`."""
    abstract = nnx.eval_shape(lambda: DecoderLayer(config, dtype=dtype, rngs=nnx.Rngs(0), impl=attention_impl))
    return nnx.split(abstract)


def build_layer(
    config: ModelConfig, params: Mapping[str, jax.Array], dtype=jnp.float32, attention_impl=None
) -> DecoderLayer:
    """A concrete DecoderLayer of `config` holding `params` (one layer, no layers axis)."""
    layer = nnx.eval_shape(lambda: DecoderLayer(config, dtype=dtype, rngs=nnx.Rngs(0), impl=attention_impl))
    extra = sorted(set(params) - set(flat_params(layer)))
    if extra:
        raise StructuredPruneError(f"parameters {extra} have no place in a layer of this config.")
    _fill(layer, lambda path: params.get(path), "layer")
    return layer


def layer_params(model: CausalLM, index: int) -> LayerParams:
    """{"attn.q_proj.kernel": (in, out), ...}: layer `index` of a stacked model."""
    return {p[len("layers.") :]: v[...][index] for p, v in flat_params(model).items() if p.startswith("layers.")}


# ----------------------------------------------------------------------------- the whole model


def assemble_structured(
    model: CausalLM,
    per_layer_results: Sequence[tuple[Mapping[str, jax.Array], np.ndarray, np.ndarray]],
    mesh: Mesh | None = None,
) -> tuple[CausalLM, np.ndarray]:
    """Stack per-layer `structured_prune_layer` results into a new, smaller CausalLM.

    Embeddings, final norm and lm_head are shared with `model`; with `mesh`, every parameter is
    placed by the sharding table (the shrunken dims must divide the tensor axis). Returns (model, head_map) where
    head_map (layers, H') int holds l·H_dense + h, the dense index of each kept head, so RestoreLCC
    can compare each kept head with its dense origin.
    """
    c = model.config
    if len(per_layer_results) != c.num_layers:
        raise StructuredPruneError(f"{len(per_layer_results)} layer results for a {c.num_layers}-layer model.")
    counts = {(len(heads), len(channels)) for _, heads, channels in per_layer_results}
    if len(counts) != 1:
        raise StructuredPruneError(
            f"layers keep different numbers of (heads, channels): {sorted(counts)}; stacked layers need one shape."
        )
    heads, channels = counts.pop()
    if heads % c.queries_per_kv:
        raise StructuredPruneError(f"{heads} kept heads are not whole KV groups of {c.queries_per_kv}.")
    new_config = shrunk_config(c, StructuredPlan(heads // c.queries_per_kv, channels))
    impl = getattr(model.layers.attn, "impl", None)
    new = nnx.eval_shape(lambda: CausalLM(new_config, dtype=model.dtype, rngs=nnx.Rngs(0), attention_impl=impl))
    old = flat_params(model)

    def value(path: str):
        if not path.startswith("layers."):
            return old[path][...] if path in old else None
        key = path[len("layers.") :]
        if any(key not in params for params, _, _ in per_layer_results):
            return None
        return jnp.stack([jnp.asarray(params[key]) for params, _, _ in per_layer_results])  # (layers, ...)

    _fill(new, value, "structured model")
    if mesh is not None:
        shard_model(new, mesh)
    head_map = np.stack([np.asarray(h, np.int64) + i * c.num_heads for i, (_, h, _) in enumerate(per_layer_results)])
    return new, head_map  # (layers, H')


def _fill(module: nnx.Module, value, label: str) -> None:
    """Set every parameter of an abstract `module` from value(path); list every problem at once."""
    problems, updates = [], []
    for path, var in flat_params(module).items():
        array = value(path)
        if array is None:
            problems.append(f"missing {path}")
        elif tuple(array.shape) != tuple(var.shape):
            problems.append(f"{path} has shape {tuple(array.shape)}, expected {tuple(var.shape)}")
        else:
            updates.append((var, array))
    if problems:
        raise StructuredPruneError(f"cannot build the {label}: " + "; ".join(problems))
    for var, array in updates:
        var.set_value(jnp.asarray(array, var.dtype))
