"""Compensation parameters, their dense form, and folding them exactly into an o_proj bias."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcc_jax.config import ModelConfig
from lcc_jax.models import CausalLM
from lcc_jax.restore.compensation import (
    dense_compensation,
    init_compensation,
    merge_trainable,
    num_trainable,
    split_trainable,
    to_dense,
)
from lcc_jax.restore.fold import FoldError, fold_compensation, folded_config
from lcc_jax.restore.top_k import TopK
from lcc_jax.sharding import flat_params

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
CONFIG = ModelConfig(model_type="llama", **BASE)


def orthonormal_basis(total: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    return np.stack([np.linalg.qr(rng.randn(d, d))[0].T for _ in range(total)]).astype(np.float32)


def test_init_selects_top_heads_with_small_normal_params():
    basis = orthonormal_basis(CONFIG.total_heads, CONFIG.head_dim)
    ranking = np.array([5, 2, 7, 0, 1, 3, 4, 6])
    comp = init_compensation(basis, ranking, 3, jax.random.key(0))
    assert comp.heads.tolist() == [5, 2, 7]
    np.testing.assert_array_equal(comp.basis, basis[[5, 2, 7]])
    assert comp.beta.shape == comp.bias.shape == (3, 8)
    assert 2e-4 < float(jnp.std(comp.beta)) < 5e-3 and 2e-4 < float(jnp.std(comp.bias)) < 5e-3
    assert num_trainable(comp) == 3 * 2 * 8
    assert init_compensation(basis, ranking, 0.25, jax.random.key(0)).heads.tolist() == [5, 2]
    assert TopK.parse(1.0).resolve(8) == 8 and TopK.parse(0.01).resolve(8) == 1
    random = init_compensation(basis, ranking, 3, jax.random.key(1), random_heads=True)
    assert len(set(random.heads.tolist())) == 3
    with pytest.raises(ValueError, match="top_k"):
        init_compensation(basis, ranking, 9, jax.random.key(0))
    with pytest.raises(ValueError, match="permutation"):
        init_compensation(basis, ranking[:4], 2, jax.random.key(0))


def test_to_dense_is_reference_formula_on_selected_heads_only():
    basis = orthonormal_basis(CONFIG.total_heads, CONFIG.head_dim)
    comp = init_compensation(basis, np.arange(8)[::-1], 2, jax.random.key(0), std=0.5)
    dense = np.asarray(dense_compensation(comp, CONFIG))  # (L, H, d)
    assert dense.shape == (2, 4, 8)
    for j, head in enumerate(comp.heads.tolist()):
        main_comp, v, b = np.asarray(comp.basis[j]), np.asarray(comp.beta[j]), np.asarray(comp.bias[j])
        expected = main_comp.T @ v + b  # bmm(main_comp.transpose(1, 2), attn_v[..., None]) + attn_b
        np.testing.assert_allclose(dense.reshape(8, 8)[head], expected, atol=1e-6)
    untouched = np.setdiff1d(np.arange(8), comp.heads)
    assert not dense.reshape(8, 8)[untouched].any()


def test_split_trainable_by_mode_and_gradients_flow():
    basis = orthonormal_basis(CONFIG.total_heads, CONFIG.head_dim)
    ranking = np.arange(8)
    for mode, names in [("full", {"beta", "bias"}), ("bias_only", {"bias"}), ("no_bias", {"beta"})]:
        comp = init_compensation(basis, ranking, 2, jax.random.key(0), mode=mode)
        trainable, frozen = split_trainable(comp)
        assert set(trainable) == names and num_trainable(comp) == 2 * 8 * len(names)
        fixed = {"beta", "bias"} - names
        for name in fixed:
            assert not np.asarray(getattr(comp, name)).any()
        back = merge_trainable(trainable, frozen)
        np.testing.assert_array_equal(dense_compensation(back, CONFIG), dense_compensation(comp, CONFIG))
        grads = jax.jit(jax.grad(lambda t, f: jnp.sum(to_dense(t, f, CONFIG) ** 2)))(trainable, frozen)
        assert set(grads) == names and all(np.asarray(g).any() for g in grads.values())


FAMILIES = {
    "llama_bias": ModelConfig(model_type="llama", qkv_bias=True, o_bias=True, **{**BASE, "num_kv_heads": 4}),
    "qwen2": ModelConfig(model_type="qwen2", qkv_bias=True, tie_word_embeddings=True, **BASE),
    "qwen3": ModelConfig(model_type="qwen3", qk_norm=True, **BASE),
    "mistral": ModelConfig(model_type="mistral", **BASE),
}


@functools.cache
def random_model(config: ModelConfig, seed: int = 0) -> CausalLM:
    """A model with non-trivial biases and half its linear weights zeroed (a pruned model)."""
    model = CausalLM(config, rngs=nnx.Rngs(seed))
    rng = np.random.RandomState(seed)
    for path, var in flat_params(model).items():
        value = np.asarray(var[...])
        if path.endswith("bias"):
            value = rng.randn(*value.shape).astype(np.float32) * 0.1
        elif path.endswith("kernel") and path.startswith("layers"):
            value = value * (rng.rand(*value.shape) > 0.5)
        var.set_value(jnp.asarray(value))
    return model


@nnx.jit
def _logits(model, tokens, compensation):
    return model(tokens, compensation=compensation).logits


@nnx.jit
def _plain_logits(model, tokens):
    return model(tokens).logits


def test_compensation_changes_the_output():
    model = random_model(CONFIG)
    comp = init_compensation(orthonormal_basis(8, 8), np.arange(8), 2, jax.random.key(0), std=0.3)
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, 64, (2, 10)))
    with_comp = np.asarray(_logits(model, tokens, dense_compensation(comp, CONFIG)))
    without = np.asarray(_logits(model, tokens, jnp.zeros((2, 4, 8))))
    assert np.abs(with_comp - without).max() > 1e-3


@pytest.mark.parametrize("family", ["llama_bias", "qwen2", "qwen3"])
def test_folded_bias_equals_unfolded(family):
    config = FAMILIES[family]
    model = random_model(config)
    basis = orthonormal_basis(config.total_heads, config.head_dim, seed=1)
    comp = init_compensation(basis, np.random.RandomState(0).permutation(8), 3, jax.random.key(2), std=0.3)
    delta = dense_compensation(comp, config)
    folded = fold_compensation(model, delta)
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, 64, (2, 10)))
    expected = np.asarray(_logits(model, tokens, delta))
    np.testing.assert_allclose(np.asarray(_plain_logits(folded, tokens)), expected, atol=1e-5)
    old, new = flat_params(model), flat_params(folded)
    for path, var in old.items():
        if path != "layers.attn.o_proj.bias":
            np.testing.assert_array_equal(np.asarray(new[path][...]), np.asarray(var[...]))  # sparsity identical


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_folded_config_is_exportable(family):
    config = folded_config(FAMILIES[family])
    assert config.o_bias and config.qkv_bias
    assert config.model_type == ("llama" if family in ("qwen2", "mistral") else FAMILIES[family].model_type)
    assert config.to_hf()["attention_bias"] is True
    assert config.replace(model_type=FAMILIES[family].model_type, qkv_bias=FAMILIES[family].qkv_bias,
                          o_bias=FAMILIES[family].o_bias) == FAMILIES[family]


def test_mistral_with_sliding_window_is_refused():
    with pytest.raises(FoldError, match="sliding window"):
        folded_config(ModelConfig(model_type="mistral", sliding_window=6, **BASE))


@pytest.mark.parametrize("family", ["qwen2"])
def test_folded_export_loads_in_transformers_with_identical_logits(tmp_path, family):
    pytest.importorskip("torch")
    export = pytest.importorskip("lcc_jax.convert.export")
    import torch
    import transformers

    config = FAMILIES[family]
    model = random_model(config)
    basis = orthonormal_basis(config.total_heads, config.head_dim, seed=1)
    comp = init_compensation(basis, np.arange(8), 4, jax.random.key(2), std=0.3)
    delta = dense_compensation(comp, config)
    folder = export.save_hf(fold_compensation(model, delta), None, tmp_path / "folded")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()
    assert hf.config.model_type == "llama" and hf.config.attention_bias
    tokens = np.random.RandomState(4).randint(0, 64, (2, 10))
    with torch.no_grad():
        got = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(_logits(model, jnp.asarray(tokens), delta)), atol=1e-4)
