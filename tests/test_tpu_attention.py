"""The TPU splash attention path (`lcc_jax.models.tpu_attention`), run here in Pallas interpret mode on CPU:
it computes what the XLA path computes at every real query (and its gradients), and it is chosen as documented."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from lcc_jax.models import tpu_attention
from lcc_jax.models.attention import AttentionMask, attention, attention_implementation, resolve_attention
from lcc_jax.sharding import MESH_AXES
from model_utils import SMALL_CONFIG, random_model

# Three rows of 20: three packed sequences then padding; all padding; left padding, a hole, one sequence.
SEGMENTS = np.array([[1] * 6 + [2] * 5 + [3] * 4 + [0] * 5, [0] * 20, [0, 0] + [1] * 8 + [0] + [1] * 9], np.int32)


def qkv(batch=3, seq=20, heads=4, kv_heads=2, head_dim=8, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(batch, seq, heads, head_dim)] + [(batch, seq, kv_heads, head_dim)] * 2
    return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


def real_part(x, segments):
    """`x` at real queries, zeros at padding (whose outputs are never read)."""
    return jnp.where(jnp.asarray(segments > 0)[:, :, None, None], x, 0)


def test_splash_equals_xla_with_packed_rows_gqa_and_a_fully_padded_row():
    q, k, v = qkv()
    segments = jnp.asarray(SEGMENTS)
    mask = AttentionMask(segments, max_segments=3)
    weights = real_part(jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32), SEGMENTS)

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * weights), argnums=(0, 1, 2)))

    xla = lambda q, k, v: attention(q, k, v, mask, "xla")  # noqa: E731
    splash = lambda q, k, v: tpu_attention.splash_attention(q, k, v, segments, interpret=True)  # noqa: E731
    out = jax.jit(splash)(q, k, v)
    assert not jnp.isnan(out).any()
    assert (out[1] == 0).all()  # the fully padded row: zeros, not NaN
    np.testing.assert_allclose(real_part(out, SEGMENTS), real_part(xla(q, k, v), SEGMENTS), atol=1e-6, rtol=0)
    (value, grads), (value_ref, grads_ref) = loss(splash)(q, k, v), loss(xla)(q, k, v)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):  # padding positions included: zero in both
        np.testing.assert_allclose(g, g_ref, atol=1e-5, rtol=0)


def test_splash_sliding_window_and_odd_head_dim_equal_xla_under_a_mesh():
    """A Mistral window over packed rows, head_dim 12 (padded to 128 lanes inside), rows and heads sharded
    over a (data=2, tensor=2) mesh: the kernel runs per shard under shard_map."""
    q, k, v = qkv(batch=4, head_dim=12, seed=2)
    segments = jnp.asarray(np.concatenate([SEGMENTS, SEGMENTS[:1]]))
    mask = AttentionMask(segments, max_segments=3, sliding_window=4)
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 1, 2), MESH_AXES)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: tpu_attention.splash_attention(q, k, v, segments, 4, interpret=True))(q, k, v)
    expected = attention(q, k, v, mask, "xla")
    np.testing.assert_allclose(real_part(out, segments), real_part(expected, segments), atol=1e-6, rtol=0)


def test_model_logits_with_forced_splash_equal_the_default(monkeypatch):
    model = random_model(SMALL_CONFIG.replace(sliding_window=5), seed=0)
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, SMALL_CONFIG.vocab_size, SEGMENTS.shape), jnp.int32)
    segments = jnp.asarray(SEGMENTS)

    def logits():  # a fresh jit per call: $LCC_ATTENTION is read while tracing
        return jax.jit(lambda state: nnx.merge(graphdef, state)(tokens, segments).logits)(state)

    monkeypatch.delenv("LCC_ATTENTION", raising=False)
    default = logits()
    monkeypatch.setenv("LCC_ATTENTION", "splash")
    forced = logits()
    real = SEGMENTS > 0
    np.testing.assert_allclose(np.asarray(forced)[real], np.asarray(default)[real], atol=2e-5, rtol=0)


def test_auto_picks_splash_on_a_tpu_when_it_applies(monkeypatch):
    monkeypatch.delenv("LCC_ATTENTION", raising=False)
    assert resolve_attention(None, jnp.bfloat16, 64) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_attention(None, jnp.bfloat16, 64) == "splash"
    assert resolve_attention("auto", jnp.float32, 72, sliding_window=4096) == "splash"
    assert resolve_attention(None, jnp.float16, 64) == "xla"  # no fp16 on the TPU kernel
    assert resolve_attention(None, jnp.bfloat16, 512) == "xla"  # head_dim beyond 256
    assert resolve_attention("xla", jnp.bfloat16, 64) == "xla"  # explicit wins
    with attention_implementation("xla"):
        assert resolve_attention(None, jnp.bfloat16, 64) == "xla"
    monkeypatch.setenv("LCC_ATTENTION", "xla")
    assert resolve_attention(None, jnp.bfloat16, 64) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setenv("LCC_ATTENTION", "splash")
    assert resolve_attention(None, jnp.float32, 8) == "splash"
    with attention_implementation("splash"):
        assert resolve_attention(None, jnp.float32, 8) == "splash"
    with pytest.raises(ValueError, match="splash"):
        resolve_attention("flash", jnp.bfloat16, 64)


def test_a_refused_splash_kernel_falls_back_to_xla_unless_asked_for(monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise NotImplementedError("no such kernel here")

    monkeypatch.delenv("LCC_ATTENTION", raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(tpu_attention, "splash_attention", refuse)
    q, k, v = qkv()
    mask = AttentionMask(jnp.asarray(SEGMENTS), max_segments=3)
    with caplog.at_level(logging.WARNING, logger="lcc_jax.models.attention"):
        out = attention(q, k, v, mask)
    assert "splash attention unavailable (no such kernel here)" in caplog.text
    np.testing.assert_array_equal(out, attention(q, k, v, mask, "xla"))
    with pytest.raises(NotImplementedError):
        attention(q, k, v, mask, "splash")
