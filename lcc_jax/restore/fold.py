"""Fold a trained compensation into an o_proj bias: the same function, no extra inference cost.

δ is the same at every token, so o_proj(z + δ) = z·W + concat_h(δ_h)·W, and with our (heads·head_dim,
embed) kernel layout the new bias is `concat_h(δ_h) @ kernel` per layer (added to any existing bias).
Weights are untouched, so masks and sparsity are unchanged.

The folded model must stay exportable to Hugging Face `transformers`:
  * Llama, Qwen3: one `attention_bias` switch covers q, k, v and o, so zero q/k/v biases are added;
  * Qwen2 has no o_proj bias in transformers; Qwen2 is exactly Llama with q/k/v biases, so the folded
    model becomes model_type "llama" with attention_bias=True;
  * Mistral without a sliding window likewise becomes "llama";
  * Mistral with a sliding window cannot be written as either, and is refused (`FoldError`).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from lcc_jax.config import ModelConfig
from lcc_jax.errors import UserError
from lcc_jax.models import CausalLM
from lcc_jax.sharding import flat_params, partition_spec

log = logging.getLogger(__name__)


class FoldError(UserError):
    """A model whose compensation cannot be folded into an exportable o_proj bias."""


def folded_config(config: ModelConfig) -> ModelConfig:
    """The config of `config`'s model with an o_proj bias, in a family transformers can load (module docstring)."""
    if config.model_type == "mistral" and config.sliding_window is not None:
        raise FoldError(
            f"this Mistral model uses a sliding window ({config.sliding_window} tokens). transformers' Mistral has no "
            "o_proj bias and its Llama has no sliding window, so a folded compensation could not be exported exactly. "
            "Keep the compensation unfolded (pass compensation= to the model) for evaluation in lcc_jax."
        )
    model_type = "llama" if config.model_type in ("qwen2", "mistral") else config.model_type
    return config.replace(model_type=model_type, qkv_bias=True, o_bias=True)


def fold_compensation(model: CausalLM, compensation: jax.Array) -> CausalLM:
    """A new CausalLM computing `model(..., compensation=compensation)` with the compensation in o_proj's bias."""
    config = model.config
    shape = (config.num_layers, config.num_heads, config.head_dim)
    if tuple(compensation.shape) != shape:
        raise FoldError(
            f"compensation has shape {tuple(compensation.shape)}; expected (layers, heads, head_dim) = {shape}."
        )
    new_config = folded_config(config)
    old = flat_params(model)
    impl = getattr(model.layers.attn, "impl", None)
    folded = nnx.eval_shape(lambda: CausalLM(new_config, dtype=model.dtype, rngs=nnx.Rngs(0), attention_impl=impl))
    kernel = old["layers.attn.o_proj.kernel"][...]  # (layers, heads·head_dim, embed)
    for path, var in flat_params(folded).items():
        if path == "layers.attn.o_proj.bias":
            bias = o_bias(kernel, compensation, old[path][...] if path in old else None)
            var.set_value(_place(bias.astype(var.dtype), path, old.get(path, old["layers.attn.o_proj.kernel"])[...]))
        elif path in old:  # the same arrays: weights, masks' zeros and shardings unchanged
            var.set_value(old[path][...])
        else:  # q/k/v biases the family's single switch requires
            var.set_value(_place(jnp.zeros(var.shape, var.dtype), path, kernel))
    log.info("folded compensation into o_proj bias (%s -> %s)", config.model_type, new_config.model_type)
    return folded


def o_bias(kernel: jax.Array, compensation: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """(layers, embed) fp32: bias + concat_h(δ_h) @ kernel, per layer."""
    layers = kernel.shape[0]
    delta = compensation.reshape(layers, -1).astype(jnp.float32)  # (layers, heads·head_dim)
    out = jnp.einsum("lk,lke->le", delta, kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out if bias is None else out + bias.astype(jnp.float32)


def _place(value: jax.Array, path: str, like: jax.Array) -> jax.Array:
    """Put a new parameter on the mesh of `like` by the sharding table, or on its device."""
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, NamedSharding):
        spec = partition_spec(path, tuple(value.shape), sharding.mesh)
        return jax.device_put(value, NamedSharding(sharding.mesh, spec))
    if sharding is not None:
        return jax.device_put(value, sharding)
    return value
