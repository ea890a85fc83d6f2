"""The decoder on its own (no PyTorch): layer scan, dtypes, padding, RoPE, rematerialisation."""

from __future__ import annotations

import collections

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcc_jax.config import ModelConfig, RopeConfig
from lcc_jax.models import CausalLM
from model_utils import SMALL_CONFIG, forward, random_model

CONFIG = SMALL_CONFIG
# Every switch on at once: windowed attention, q/k norms, biases, tied embeddings, scaled RoPE.
EVERYTHING = CONFIG.replace(
    model_type="qwen3",
    head_dim=12,
    qk_norm=True,
    qkv_bias=True,
    o_bias=True,
    tie_word_embeddings=True,
    sliding_window=4,
    rope=RopeConfig(theta=1e4, type="linear", factor=2.0),
)


def tokens_and_mask(batch: int = 2, seq: int = 10, seed: int = 0):
    tokens = np.random.RandomState(seed).randint(0, CONFIG.vocab_size, (batch, seq)).astype(np.int32)
    return jnp.asarray(tokens), jnp.ones((batch, seq), jnp.int32)


def _eqn_count(jaxpr) -> int:
    return len(jaxpr.eqns) + sum(_eqn_count(sub) for sub in jex.subjaxprs(jaxpr))


def _forward_jaxpr(config: ModelConfig):
    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    tokens, mask = tokens_and_mask()
    return jax.make_jaxpr(lambda s, t, m: nnx.merge(graphdef, s)(t, m).logits)(state, tokens, mask).jaxpr


# ----------------------------------------------------------------------------- structure (tracing only)


def test_traced_program_does_not_grow_with_depth():
    shallow, deep = _forward_jaxpr(CONFIG.replace(num_layers=2)), _forward_jaxpr(CONFIG.replace(num_layers=8))
    assert _eqn_count(shallow) == _eqn_count(deep)
    (scan,) = [e for e in deep.eqns if e.primitive.name == "scan"]
    assert scan.params["length"] == 8


def test_every_per_layer_parameter_is_stacked_on_a_leading_layers_axis():
    abstract = nnx.eval_shape(lambda: CausalLM(EVERYTHING, rngs=nnx.Rngs(0)))
    layer_params = nnx.to_flat_state(nnx.state(abstract.layers, nnx.Param))
    assert len(layer_params) > 10
    assert all(var.shape[0] == EVERYTHING.num_layers for _, var in layer_params)
    assert tuple(abstract.layers.attn.q_proj.kernel.shape) == (2, 32, 4 * 12)  # (layers, embed, heads*head_dim)
    assert tuple(abstract.layers.attn.o_proj.kernel.shape) == (2, 4 * 12, 32)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_forward_shapes_and_dtypes_follow_the_model_dtype(dtype):
    model = random_model(EVERYTHING, dtype=dtype)
    tokens, mask = tokens_and_mask(batch=3, seq=7)
    out = forward(model, tokens, mask, capture="all")
    assert out.logits.shape == (3, 7, 64) and out.logits.dtype == dtype
    assert out.hidden.shape == (3, 7, 32) and out.hidden.dtype == dtype
    assert out.heads.shape == (2, 3, 7, 4, 12) and out.heads.dtype == dtype
    assert np.isfinite(np.asarray(out.logits, np.float32)).all()
    if dtype == jnp.float32:
        assert forward(model, tokens, mask, return_logits=False).logits is None


@pytest.mark.parametrize("config", [CONFIG, EVERYTHING], ids=["llama", "everything"])
def test_right_padding_leaves_real_positions_unchanged(config):
    model = random_model(config, seed=1)
    tokens, _ = tokens_and_mask(batch=1, seq=7, seed=2)
    junk = jnp.asarray(np.random.RandomState(3).randint(0, 64, (1, 5)), jnp.int32)
    padded = jnp.concatenate([tokens, junk], axis=1)
    mask = jnp.concatenate([jnp.ones((1, 7), jnp.int32), jnp.zeros((1, 5), jnp.int32)], axis=1)
    # Two rows: the same real tokens followed by different padding.
    batch = jnp.concatenate([padded, padded.at[0, 7:].set(0)], axis=0)
    padded_out = forward(model, batch, jnp.concatenate([mask, mask]), capture="all")
    alone = forward(model, tokens, jnp.ones((1, 7), jnp.int32), capture="all")
    for row in range(2):
        np.testing.assert_allclose(padded_out.logits[row, :7], alone.logits[0], atol=1e-5)
        np.testing.assert_allclose(padded_out.heads[:, row, :7], alone.heads[:, 0], atol=1e-5)


def test_no_mask_means_every_token_is_real():
    model = random_model(CONFIG)
    tokens, ones = tokens_and_mask()
    without = forward(model, tokens).logits
    np.testing.assert_array_equal(np.asarray(without), np.asarray(forward(model, tokens, ones).logits))


def test_padding_mask_hides_padded_keys_from_real_queries():
    # Left padding puts padding *before* real tokens, where causality alone would not hide it
    # (right padding never reaches a real query, mask or no mask).
    model = random_model(CONFIG, seed=1)
    tokens, _ = tokens_and_mask(batch=1, seq=6, seed=2)
    pad = 3
    left = jnp.concatenate([jnp.full((1, pad), 5, jnp.int32), tokens], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), jnp.ones((1, 6), jnp.int32)], axis=1)
    positions = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0)
    masked = np.asarray(forward(model, left, mask, positions=positions).logits)
    alone = np.asarray(forward(model, tokens).logits)
    assert np.isfinite(masked).all()  # fully masked padding rows must not poison the real ones
    np.testing.assert_allclose(masked[0, pad:], alone[0], atol=1e-5)
    unmasked = np.asarray(forward(model, left, positions=positions).logits)
    assert np.abs(unmasked[0, pad:] - alone[0]).max() > 1e-3


def test_rope_is_relative_so_shifting_all_positions_keeps_logits():
    model = random_model(CONFIG.replace(sliding_window=None))
    tokens, mask = tokens_and_mask(batch=1, seq=8)
    base = jnp.arange(8)[None]
    at_zero = forward(model, tokens, mask, positions=base).logits
    np.testing.assert_array_equal(np.asarray(forward(model, tokens, mask).logits), np.asarray(at_zero))
    np.testing.assert_allclose(forward(model, tokens, mask, positions=base + 37).logits, at_zero, atol=1e-4)
    # But positions are not ignored: reversing them changes the result.
    assert np.abs(np.asarray(forward(model, tokens, mask, positions=base[:, ::-1]).logits - at_zero)).max() > 1e-3


def test_remat_gives_the_same_logits_and_gradients():
    model = random_model(CONFIG.replace(num_layers=3), seed=4)
    graphdef, state = nnx.split(model)
    tokens, mask = tokens_and_mask(batch=2, seq=8)
    compensation = jnp.asarray(np.random.RandomState(5).normal(0, 0.1, (3, 4, 8)), jnp.float32)

    def loss(state, compensation, remat):
        logits = nnx.merge(graphdef, state)(tokens, mask, compensation=compensation, remat=remat).logits
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]), logits

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (g_state, g_comp), logits = grad(state, compensation, False)
    (r_state, r_comp), r_logits = grad(state, compensation, True)
    np.testing.assert_allclose(r_logits, logits, atol=1e-6)
    # recomputing fuses differently: a few fp32 ulps (jax 0.10 put one embedding gradient 4.7e-7 off on 0.013)
    np.testing.assert_allclose(r_comp, g_comp, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(g_comp)).max() > 0
    for (path, a), (_, b) in zip(nnx.to_flat_state(g_state), nnx.to_flat_state(r_state)):
        np.testing.assert_allclose(b[...], a[...], rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_remat_recomputes_the_layer_in_the_backward_pass():
    # remat=True must actually change the program: the layer body appears under a checkpoint (remat) primitive.
    graphdef, state = nnx.split(random_model(CONFIG))
    tokens, mask = tokens_and_mask()

    def prims(remat: bool) -> collections.Counter:
        fn = lambda s: nnx.merge(graphdef, s)(tokens, mask, remat=remat).logits.sum()  # noqa: E731
        jaxpr = jax.make_jaxpr(jax.grad(fn))(state).jaxpr
        counts = collections.Counter()

        def walk(j):
            counts.update(e.primitive.name for e in j.eqns)
            for sub in jex.subjaxprs(j):
                walk(sub)

        walk(jaxpr)
        return counts

    assert prims(True)["dot_general"] > prims(False)["dot_general"]


def test_xla_attention_recomputes_its_scores_in_the_backward_pass():
    """The backward pass keeps no (batch, heads, seq, seq) tensor (a 7B-shape train step on XLA attention asked an
    H100 for 52.93 GiB with them), and its gradients are those of keeping them."""
    from jax._src.ad_checkpoint import saved_residuals

    from lcc_jax.models.attention import recomputed_scores

    model = random_model(CONFIG.replace(num_layers=2), seed=6)
    graphdef, state = nnx.split(model)
    seq = 24  # no other dimension of the model is 24
    tokens, mask = tokens_and_mask(batch=2, seq=seq)
    compensation = jnp.asarray(np.random.RandomState(7).normal(0, 0.1, (2, 4, 8)), jnp.float32)

    def loss(compensation, recompute):
        with recomputed_scores(recompute):
            logits = nnx.merge(graphdef, state)(tokens, mask, compensation=compensation).logits
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

    def square(recompute):  # residuals with two seq-long dimensions: scores, probabilities, the dense mask
        return [aval.shape for aval, _ in saved_residuals(lambda c: loss(c, recompute), compensation)
                if list(aval.shape).count(seq) >= 2]

    assert square(True) == [] and square(False), square(False)
    kept, recomputed = (jax.jit(jax.grad(loss), static_argnums=1)(compensation, r) for r in (False, True))
    assert np.abs(np.asarray(kept)).max() > 0
    np.testing.assert_allclose(recomputed, kept, rtol=1e-5, atol=1e-7)
