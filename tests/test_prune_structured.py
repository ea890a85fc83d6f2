"""Structured pruning on tiny random models: statistics, scores, plan, exact bias compensation, HF export."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcc_jax.config import ModelConfig
from lcc_jax.pruning.structured import (
    StructuredPlan,
    StructuredPruneError,
    assemble_structured,
    build_layer,
    driver_hooks,
    layer_params,
    removed_fraction,
    shrunk_config,
    structured_plan,
    structured_prune_layer,
    structured_stats_init,
    structured_stats_update,
    unit_params,
)
from lcc_jax.pruning.structured_scores import ChannelStats, channel_scores, group_scores, head_scores
from lcc_jax.sharding import flat_params
from tests.tiny import hf_config, hf_model, lcc_model, random_batch


@functools.cache
def dense(family: str):
    torch_model = hf_model(family)
    return lcc_model(torch_model)


def config(family: str) -> ModelConfig:
    return ModelConfig.from_hf(hf_config(family).to_dict())


def calib():
    return random_batch(batch=3, seq=10, pad_last=4)


@nnx.jit
def linear_inputs(layer, x, cos, sin, mask4):
    return layer.linear_inputs(x, cos, sin, mask4)


@nnx.jit
def forward(layer, x, cos, sin, mask4):
    return layer(x, cos, sin, mask4)[0]


@functools.cache
def pruned(family: str, ratio: float):
    """Reference sequential loop: stats from the pruned prefix, prune, recompute with the pruned layer.

    Returns (shrunken model, head_map, per-layer results, final hidden states of the loop).
    """
    model = dense(family)
    c = model.config
    plan = structured_plan(c, ratio)
    small = shrunk_config(c, plan)
    tokens, mask = calib()
    x, cos, sin, mask4 = model.prepare(jnp.asarray(tokens), jnp.asarray(mask))
    results = []
    for i in range(c.num_layers):
        params = layer_params(model, i)
        _, inputs = linear_inputs(build_layer(c, params), x, cos, sin, mask4)
        stats = structured_stats_update(structured_stats_init(c), inputs, jnp.asarray(mask))
        result = structured_prune_layer(params, stats["attn.o_proj"], stats["mlp.down_proj"], *plan, config=c)
        results.append(result)
        x = forward(build_layer(small, result[0]), x, cos, sin, mask4)
    new, head_map = assemble_structured(model, results)
    return new, head_map, results, x


# ----------------------------------------------------------------------------- statistics and scores


def test_channel_stats_match_numpy_over_real_tokens_only():
    rng = np.random.RandomState(0)
    xs = [rng.randn(2, 7, 5).astype(np.float32) * 3 + 1 for _ in range(3)]
    masks = [np.ones((2, 7), np.int32), np.zeros((2, 7), np.int32), np.ones((2, 7), np.int32)]
    masks[2][1, 4:] = 0
    stats = ChannelStats.init(5)
    for x, m in zip(xs, masks):
        stats = stats.update(jnp.asarray(x), jnp.asarray(m))
    real = np.concatenate([x[m.astype(bool)] for x, m in zip(xs, masks)])  # (tokens, 5)
    assert float(stats.count) == len(real)
    np.testing.assert_allclose(stats.mean, real.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.variance, real.var(0), rtol=1e-5)
    one_batch = ChannelStats.init(5).update(jnp.asarray(real))
    np.testing.assert_allclose(one_batch.variance, stats.variance, rtol=1e-5)


def test_scores_match_numpy_loop():
    rng = np.random.RandomState(1)
    heads, kv, d, embed, inter = 6, 2, 4, 8, 10
    tok = rng.randn(50, heads * d).astype(np.float32) * rng.rand(heads * d).astype(np.float32)
    mlp_tok = rng.randn(50, inter).astype(np.float32)
    o = rng.randn(heads * d, embed).astype(np.float32)
    down = rng.randn(inter, embed).astype(np.float32)
    hs = ChannelStats.init(heads * d).update(jnp.asarray(tok))
    ms = ChannelStats.init(inter).update(jnp.asarray(mlp_tok))

    want_head = np.zeros(heads)
    for h in range(heads):
        for j in range(h * d, (h + 1) * d):
            want_head[h] += tok[:, j].var() * sum(o[j, e] ** 2 for e in range(embed))
    want_group = [sum(want_head[h] for h in range(heads) if h // (heads // kv) == g) for g in range(kv)]
    want_mlp = [mlp_tok[:, j].var() * sum(down[j, e] ** 2 for e in range(embed)) for j in range(inter)]

    got_head = head_scores(hs, jnp.asarray(o), heads)
    np.testing.assert_allclose(got_head, want_head, rtol=1e-4)
    np.testing.assert_allclose(group_scores(got_head, kv), want_group, rtol=1e-4)
    np.testing.assert_allclose(channel_scores(ms, jnp.asarray(down)), want_mlp, rtol=1e-4)


# ----------------------------------------------------------------------------- plan and config


def test_plan_turns_ratio_into_groups_and_channels():
    c = config("llama")  # embed 64, 4 heads / 2 kv of 16, inter 80
    group, channel, total = unit_params(c)
    assert (group, channel, total) == (64 * 16 * 6, 192, 2 * 6144 + 80 * 192)
    assert structured_plan(c, 0.0) == StructuredPlan(2, 80)
    plan = structured_plan(c, 0.3)  # round(0.6) = 1 group; round((8294.4 - 6144) / 192) = 11 channels
    assert plan == StructuredPlan(1, 69)
    assert abs(removed_fraction(c, plan) - 0.3) <= channel / 2 / total
    small = shrunk_config(c, plan)
    assert (small.num_heads, small.num_kv_heads, small.intermediate_size) == (2, 1, 69)
    assert small.o_bias and small.mlp_bias and small.qkv_bias and small.model_type == "llama"
    qwen = shrunk_config(config("qwen2"), plan)
    assert qwen.model_type == "llama" and qwen.qkv_bias and qwen.o_bias
    qwen.to_hf()  # exportable


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "0.2", True, None])
def test_plan_refuses_ratio_outside_unit_interval(ratio):
    with pytest.raises(StructuredPruneError):
        structured_plan(config("llama"), ratio)


def test_plan_refuses_ratio_that_leaves_nothing():
    c = config("llama")
    with pytest.raises(StructuredPruneError, match="KV groups"):
        structured_plan(c, 0.8)  # round(1.6) = 2 of 2 groups
    attention_heavy = c.replace(num_heads=4, num_kv_heads=1, intermediate_size=4)
    with pytest.raises(StructuredPruneError, match="MLP channels"):
        structured_plan(attention_heavy, 0.4)  # no group goes, so the MLP would have to lose > 4 channels


# ----------------------------------------------------------------------------- pruning a model


def test_ratio_zero_leaves_logits_unchanged():
    model = dense("llama")
    new, head_map, _, _ = pruned("llama", 0.0)
    tokens, mask = calib()
    want = model(jnp.asarray(tokens), jnp.asarray(mask)).logits
    got = new(jnp.asarray(tokens), jnp.asarray(mask)).logits
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(head_map, np.arange(12).reshape(3, 4))


def test_shapes_shrink_as_planned_and_model_runs():
    new, head_map, results, x = pruned("llama", 0.3)
    c = new.config
    assert (c.num_heads, c.num_kv_heads, c.intermediate_size) == (2, 1, 69)
    p = {k: v[...].shape for k, v in flat_params(new).items()}
    assert p["layers.attn.q_proj.kernel"] == (3, 64, 2 * 16)
    assert p["layers.attn.k_proj.kernel"] == p["layers.attn.v_proj.kernel"] == (3, 64, 16)
    assert p["layers.attn.o_proj.kernel"] == (3, 32, 64) and p["layers.attn.o_proj.bias"] == (3, 64)
    assert p["layers.mlp.gate_proj.kernel"] == p["layers.mlp.up_proj.kernel"] == (3, 64, 69)
    assert p["layers.mlp.down_proj.kernel"] == (3, 69, 64) and p["layers.mlp.down_proj.bias"] == (3, 64)
    assert head_map.shape == (3, 2)
    tokens, mask = calib()
    out = new(jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_allclose(out.hidden, new.final_norm(x), atol=1e-5)  # assembled == sequential
    assert np.isfinite(np.asarray(out.logits)).all()


def test_head_map_holds_dense_indices_of_whole_gqa_groups():
    new, head_map, results, _ = pruned("llama", 0.3)  # 4 query heads, 2 KV heads: groups of 2
    assert head_map.shape == (3, 2) and new.config.num_heads == 2
    for layer, (_, kept_heads, _) in enumerate(results):
        group = kept_heads[0] // 2
        np.testing.assert_array_equal(kept_heads, np.arange(2) + 2 * group)
        np.testing.assert_array_equal(head_map[layer], layer * 4 + kept_heads)
    assert len({tuple(r[1]) for r in results}) > 1  # layers choose their own groups
    out = new(jnp.asarray(calib()[0]), capture="all", compensation=jnp.zeros((3, 2, new.config.head_dim)))
    assert out.heads.shape[-2:] == (2, new.config.head_dim)


def test_removing_constant_channels_with_compensation_leaves_layer_output_unchanged():
    model = dense("llama_mha_bias")  # 4 heads, 4 KV heads, biases everywhere
    c = model.config
    params = layer_params(model, 0)
    d = c.head_dim
    # Head 2 constant: its v columns are zero, so softmax-averaging v gives its bias at every token.
    params["attn.v_proj.kernel"] = params["attn.v_proj.kernel"].at[:, 2 * d : 3 * d].set(0.0)
    params["attn.v_proj.bias"] = params["attn.v_proj.bias"].at[2 * d : 3 * d].set(jnp.linspace(-1, 1, d))
    # MLP channels 3, 10, 50 constant: silu(gate bias) * up bias.
    const = np.array([3, 10, 50])
    for name, b in (("gate", 1.0), ("up", 0.5)):
        params[f"mlp.{name}_proj.kernel"] = params[f"mlp.{name}_proj.kernel"].at[:, const].set(0.0)
        params[f"mlp.{name}_proj.bias"] = params[f"mlp.{name}_proj.bias"].at[const].set(b)

    tokens, mask = calib()
    x, cos, sin, mask4 = model.prepare(jnp.asarray(tokens), jnp.asarray(mask))
    want, inputs = build_layer(c, params).linear_inputs(x, cos, sin, mask4)
    stats = structured_stats_update(structured_stats_init(c), inputs, jnp.asarray(mask))
    assert float(stats["attn.o_proj"].variance[2 * d : 3 * d].max()) < 1e-10
    plan = StructuredPlan(c.num_kv_heads - 1, c.intermediate_size - len(const))
    new, kept_heads, kept_channels = structured_prune_layer(
        params, stats["attn.o_proj"], stats["mlp.down_proj"], *plan, config=c
    )
    np.testing.assert_array_equal(kept_heads, [0, 1, 3])
    np.testing.assert_array_equal(kept_channels, np.setdiff1d(np.arange(c.intermediate_size), const))
    got, _ = build_layer(shrunk_config(c, plan), new)(x, cos, sin, mask4)
    np.testing.assert_allclose(got, want, atol=1e-5)
    uncompensated, _, _ = structured_prune_layer(
        params, stats["attn.o_proj"], stats["mlp.down_proj"], *plan, config=c, compensate=False
    )
    off, _ = build_layer(shrunk_config(c, plan), uncompensated)(x, cos, sin, mask4)
    assert float(jnp.abs(off - want).max()) > 1e-2  # the compensation is what makes it exact


# transformers 5's LlamaConfig refuses hidden_size % num_attention_heads != 0 (even with head_dim
# set), so each case keeps a head count dividing 64: llama_mha_bias at 0.5 keeps 2 of 4 heads.
@pytest.mark.parity
@pytest.mark.parametrize("family, ratio", [("llama", 0.3), ("qwen2_tied", 0.3), ("llama_mha_bias", 0.5)])
def test_shrunk_model_exports_to_transformers_with_equal_logits(family, ratio):
    import torch
    import transformers

    from lcc_jax.convert.assign import hf_tensors

    new, _, _, _ = pruned(family, ratio)
    hf = new.config.to_hf()
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch_model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    state = {name: torch.from_numpy(np.array(array)) for name, array in hf_tensors(new)}
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if new.config.tie_word_embeddings else set())
    tokens, mask = calib()
    with torch.no_grad():
        ids, attention = torch.from_numpy(tokens).long(), torch.from_numpy(mask)
        want = torch_model(input_ids=ids, attention_mask=attention).logits.numpy()
    got = np.asarray(new(jnp.asarray(tokens), jnp.asarray(mask)).logits)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4)


# ----------------------------------------------------------------------------- bad input


def test_prune_layer_and_assemble_refuse_bad_input():
    model = dense("llama")
    c = model.config
    params = layer_params(model, 0)
    hs, ms = ChannelStats.init(c.num_heads * c.head_dim), ChannelStats.init(c.intermediate_size)
    for keep in [(0, 10), (3, 10), (1, 0), (1, 81)]:
        with pytest.raises(StructuredPruneError):
            structured_prune_layer(params, hs, ms, *keep, config=c)
    with pytest.raises(StructuredPruneError, match="statistics"):
        structured_prune_layer(params, ChannelStats.init(7), ms, 1, 10, config=c)
    with pytest.raises(StructuredPruneError, match="unknown"):
        structured_prune_layer({**params, "attn.extra": params["input_norm.scale"]}, hs, ms, 1, 10, config=c)
    results = [structured_prune_layer(params, hs, ms, 1, 10 + (i == 2), config=c) for i in range(3)]
    with pytest.raises(StructuredPruneError, match="different numbers"):
        assemble_structured(model, results)
    with pytest.raises(StructuredPruneError, match="layer results"):
        assemble_structured(model, results[:2])
    with pytest.raises(ValueError, match="mask shape"):
        hs.update(jnp.zeros((2, 5, c.num_heads * c.head_dim)), jnp.ones((2, 4)))


def test_driver_hooks_run_in_sequential_driver():
    from lcc_jax.pruning.sequential import CalibrationStates, iterate_layers

    model = dense("llama")
    plan = structured_plan(model.config, 0.3)
    tokens = calib()[0][:2]
    states = CalibrationStates.embed(model, tokens, batch_size=1)
    results = [(p, h, ch) for _, p, (h, ch) in iterate_layers(model, states, **driver_hooks(model.config, plan))]
    new, head_map = assemble_structured(model, results)
    assert head_map.shape == (3, 2) and new.config.intermediate_size == plan.keep_channels
    hidden = new(jnp.asarray(tokens)).hidden
    np.testing.assert_allclose(hidden, new.final_norm(jnp.concatenate(states.batches)), atol=1e-5)
