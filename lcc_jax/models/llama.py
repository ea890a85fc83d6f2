"""One Flax NNX decoder for the Llama family (Llama 1/2/3, Mistral, Qwen2, Qwen3, SmolLM2).

Layers are stacked (every per-layer parameter has a leading `layers` axis) and run with
`jax.lax.scan`, so compile time does not grow with depth.

The attention block has two named doors at the o_proj input, where head (l, h) is slice
`h * head_dim : (h + 1) * head_dim` exactly as in PyTorch `transformers`:
  * capture: return the per-head outputs, all positions or chosen ones;
  * compensation: add a per-head vector (layers, heads, head_dim) to every token, or one set per batch
    row (layers, batch, heads, head_dim), so several restorations train side by side in one batch.
Neither costs anything when not asked for. `stop_backward_at=n` (static) runs layers below n forward only,
so a train step whose trainable parameters enter at layer n or above has no backward pass below it.

`attention_mask` rows are segment ids (lcc_jax.models.attention): 1/0 for a right-padded row, 1, 2, ...
for sequences packed into one row. Attention runs through cuDNN's flash attention on GPUs in
bf16/fp16 and through XLA elsewhere (`attention_impl` or $LCC_ATTENTION overrides the choice).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lcc_jax.config import ModelConfig
from lcc_jax.models.attention import AttentionImpl, AttentionMask, attention, segment_mask_4d
from lcc_jax.models.rope import apply_rotary, inverse_frequencies, rotary_tables
from lcc_jax.sharding import activation_constraint

Capture = None | Literal["all"] | jax.Array  # jax.Array: (batch, positions) int indices

_init_kernel = nnx.initializers.normal(stddev=0.02)


class CausalLMOutput(NamedTuple):
    logits: jax.Array | None  # (batch, seq, vocab), or None when return_logits=False
    hidden: jax.Array  # (batch, seq, embed): final-norm output
    heads: jax.Array | None  # (layers, batch, positions, heads, head_dim) when capture is asked for


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). kernel: (in, out), as Flax stores it (HF's weight transposed)."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_init_kernel(rngs.params(), (d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        # bf16/fp16 operands: the product is emitted in x's dtype; XLA accumulates it in fp32 on every
        # backend (cuBLAS compute type 32F, Triton, the TPU MXU, XLA:CPU) without an fp32 copy of the output.
        y = jnp.dot(x, self.kernel[...].astype(x.dtype), preferred_element_type=x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, *, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...] * xf.astype(x.dtype)).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs, impl: AttentionImpl = None):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias, dtype=dtype, rngs=rngs)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.impl = impl

    def __call__(
        self,
        x: jax.Array,  # (batch, seq, embed)
        cos: jax.Array,  # (batch, seq, head_dim)
        sin: jax.Array,
        mask: AttentionMask | jax.Array,  # or a (batch, 1, seq, seq) bool array, True = attend
        capture: Capture,
        compensation: jax.Array | None,  # (heads, head_dim), or (batch, heads, head_dim): one per row
    ) -> tuple[jax.Array, jax.Array | None]:
        batch, seq, _ = x.shape
        q = self.q_proj(x).reshape(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        heads = attention(q, k, v, mask, self.impl)  # (b, s, heads, hd)
        if compensation is not None:  # door 2: add per-head vectors before o_proj
            per_row = compensation[:, None] if compensation.ndim == 3 else compensation  # (b, 1, h, hd)
            heads = heads + per_row.astype(heads.dtype)
        captured = _select_positions(heads, capture)  # door 1: read per-head outputs
        return self.o_proj(heads.reshape(batch, seq, self.num_heads * self.head_dim)), captured


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        c = config
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.down_input(x))

    def down_input(self, x: jax.Array) -> jax.Array:
        """silu(gate(x)) * up(x): (..., intermediate), the input of down_proj."""
        return jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)


def batch_constraint(x: jax.Array) -> jax.Array:
    """Keep activations (batch, ...) split over the mesh's batch axes while tracing under `jax.set_mesh`.

    Without it XLA may leave fsdp-sharded weights in place and split the activations along `embed`
    instead: every device then computes on the whole batch and all-reduces partial matmuls (on a 70B
    shape over 8 devices, 255 instead of 88 GiB per device for a train step). No-op without a mesh.
    """
    return activation_constraint(x, ("batch", *([None] * (x.ndim - 1))))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs, impl: AttentionImpl = None):
        self.input_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.attn = Attention(config, dtype=dtype, rngs=rngs, impl=impl)
        self.post_attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, capture: Capture = None, compensation=None):
        x = batch_constraint(x)
        attn_out, captured = self.attn(self.input_norm(x), cos, sin, mask, capture, compensation)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x))
        return batch_constraint(x), captured

    def linear_inputs(self, x, cos, sin, mask) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The layer's output and the input of each of its linears, keyed by the first linear that reads it.

        For pruning calibration: q/k/v share `attn.q_proj`'s input, gate/up share `mlp.gate_proj`'s.
        """
        normed = self.input_norm(x)
        attn_out, heads = self.attn(normed, cos, sin, mask, "all", None)
        x = x + attn_out
        normed_mlp = self.post_attn_norm(x)
        down_in = self.mlp.down_input(normed_mlp)
        inputs = {
            "attn.q_proj": normed,
            "attn.o_proj": heads.reshape(*heads.shape[:2], -1),
            "mlp.gate_proj": normed_mlp,
            "mlp.down_proj": down_in,
        }
        return x + self.mlp.down_proj(down_in), inputs


class CausalLM(nnx.Module):
    """Decoder-only language model; `layers` holds all decoder layers stacked on axis 0."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
        attention_impl: AttentionImpl = None,
    ):
        self.config = config
        self.dtype = dtype
        self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)

        @nnx.vmap(in_axes=0, out_axes=0)
        def make_layers(key):
            return DecoderLayer(config, dtype=dtype, rngs=nnx.Rngs(params=key), impl=attention_impl)

        self.layers = make_layers(jax.random.split(rngs.params(), config.num_layers))
        self.final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        tokens: jax.Array,  # (batch, seq) int
        attention_mask: jax.Array | None = None,  # (batch, seq): 0 = padding, k > 0 = k-th sequence of the row
        *,
        positions: jax.Array | None = None,  # (batch, seq); default 0..seq-1 as in HF (per packed sequence)
        capture: Capture = None,
        compensation: jax.Array | None = None,  # (layers, heads, head_dim) or (layers, batch, heads, head_dim)
        return_logits: bool = True,
        remat: bool = False,
        stop_backward_at: int = 0,  # static: layers below it run forward only (see _layers_cut)
    ) -> CausalLMOutput:
        c = self.config
        shared, per_row = (c.num_layers, c.num_heads, c.head_dim), (c.num_layers, tokens.shape[0], c.num_heads, c.head_dim)
        if compensation is not None and compensation.shape not in (shared, per_row):
            raise ValueError(
                f"compensation has shape {compensation.shape}; expected (layers, heads, head_dim) = {shared}, "
                f"or one vector set per row, (layers, batch, heads, head_dim) = {per_row}."
            )
        if not 0 <= stop_backward_at <= c.num_layers:
            raise ValueError(f"stop_backward_at must be in [0, {c.num_layers}], not {stop_backward_at}.")
        x, cos, sin, mask = self.prepare(tokens, attention_mask, positions)

        graphdef, layer_state = nnx.split(self.layers)

        def body(h, per_layer):
            state, comp = per_layer
            layer = nnx.merge(graphdef, state)
            return layer(h, cos, sin, mask, capture, comp)

        if stop_backward_at:
            x, heads = _layers_cut(body, layer_state, x, compensation, stop_backward_at, c.num_layers, remat)
        else:
            if remat:
                body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
            x, heads = jax.lax.scan(body, x, (layer_state, compensation))
        x = self.final_norm(x)
        logits = self.logits(x) if return_logits else None
        return CausalLMOutput(logits=logits, hidden=x, heads=heads)

    def prepare(self, tokens, attention_mask=None, positions=None):
        """Embeddings and what every layer shares: x (b, s, embed), cos/sin (b, s, head_dim), an AttentionMask."""
        c = self.config
        batch, seq = tokens.shape
        mask = AttentionMask.build(attention_mask, batch, seq, c.sliding_window)
        if positions is None:
            if attention_mask is None:
                positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
            else:
                positions = mask.positions()
        x = self.embed(tokens)
        cos, sin = rotary_tables(positions, inverse_frequencies(c.rope, c.head_dim), x.dtype)
        return x, cos, sin, mask

    def logits(self, hidden: jax.Array) -> jax.Array:
        """(batch, seq, embed) -> (batch, seq, vocab), through lm_head or the tied embedding."""
        if self.lm_head is None:
            table = self.embed.embedding[...].astype(hidden.dtype)
            return jnp.einsum("bsd,vd->bsv", hidden, table, preferred_element_type=jnp.float32).astype(hidden.dtype)
        return self.lm_head(hidden)


def _layers_cut(body, layer_state, x, compensation, cut: int, num_layers: int, remat: bool):
    """The layer scan with no backward pass below layer `cut`: (output, captured heads or None).

    Layers [0, cut) run forward only, under `stop_gradient` (their compensation too: its gradient there is
    zero; pass a cut no higher than the lowest layer whose compensation trains); layers [cut, L) are
    differentiated as in the plain scan. The model's weights are frozen, so when nothing below `cut` trains,
    the loss and the gradients are those of the plain scan and the backward pass skips `cut` layers.
    Both scans index the stacked weights by layer (`dynamic_index_in_dim`) instead of slicing the stack,
    which would copy the weights. Without remat, what the backward pass needs is saved as in the plain
    scan, except the per-layer weight slices (recomputed from the stack: no stacked copy of the weights);
    with remat, nothing is saved, as in the plain scan.
    """

    def indexed(h, per_layer):
        i, comp = per_layer
        state = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), layer_state)
        return body(h, (state, comp))

    def part(start: int, stop: int):
        return None if compensation is None else compensation[start:stop]

    below = None if compensation is None else jax.lax.stop_gradient(part(0, cut))
    x, heads_below = jax.lax.scan(indexed, x, (jnp.arange(cut), below))
    x = jax.lax.stop_gradient(x)
    if cut == num_layers:
        return x, heads_below
    policy = jax.checkpoint_policies.nothing_saveable if remat else _save_all_but_weight_slices
    x, heads_above = jax.lax.scan(jax.checkpoint(indexed, policy=policy), x,
                                  (jnp.arange(cut, num_layers), part(cut, num_layers)))
    heads = None if heads_above is None else jnp.concatenate([heads_below, heads_above], axis=0)
    return x, heads


def _save_all_but_weight_slices(prim, *_, **__) -> bool:
    """Checkpoint policy: save every residual (as no checkpoint does) except a layer's weights indexed out of
    the stack (`dynamic_slice` + `squeeze`), which the backward pass indexes again."""
    return prim not in (jax.lax.dynamic_slice_p, jax.lax.squeeze_p)


def attention_mask_4d(
    attention_mask: jax.Array | None, batch: int, seq: int, sliding_window: int | None
) -> jax.Array:
    """(batch, 1, seq, seq) bool: causal, optionally windowed, hiding padded keys and other packed sequences."""
    segments = jnp.ones((batch, seq), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    return segment_mask_4d(segments, sliding_window)


def last_token_positions(attention_mask: jax.Array) -> jax.Array:
    """(batch, 1) index of each right-padded sequence's last real token, for `capture=`."""
    return (jnp.sum((attention_mask > 0).astype(jnp.int32), axis=-1, keepdims=True) - 1).clip(0)


def _select_positions(heads: jax.Array, capture: Capture) -> jax.Array | None:
    if capture is None:
        return None
    if isinstance(capture, str):
        if capture != "all":
            raise ValueError(f"capture must be None, 'all' or an int array of positions, not {capture!r}.")
        return heads
    index = capture.astype(jnp.int32)[:, :, None, None]  # (batch, positions, 1, 1)
    return jnp.take_along_axis(heads, index, axis=1)
