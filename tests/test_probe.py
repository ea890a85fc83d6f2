"""Contrastive probes: all heads at once (vmap) equal one probe per head trained in a Python loop."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lcc_jax.restore.probe import (
    ProbeConfig,
    ProbeResult,
    init_probe,
    layer_head,
    rank_heads,
    split_pairs,
    train_probes,
)


def test_split_is_sklearns_train_test_split_by_pair():
    train, val = split_pairs(10)  # train_test_split(range(10), test_size=0.3, random_state=42)
    assert val.tolist() == [8, 1, 5] and train.tolist() == [0, 7, 2, 9, 4, 3, 6]
    train, val = split_pairs(101, 0.3, seed=3)
    assert val.size == 31 and sorted(np.concatenate([train, val]).tolist()) == list(range(101))
    with pytest.raises(ValueError, match="cannot be split"):
        split_pairs(1)


def _loss(params, x, y):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(x @ params["weight"] + params["bias"], y))


@functools.partial(jax.jit, static_argnums=0)
def _adam_step(opt, params, state, x, y):
    updates, state = opt.update(jax.grad(_loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state


def loop_probe(key, x_train, y_train, x_val, y_val, epochs, lr):
    """One head, concatenated features, as the reference trains it (sigmoid + mean BCE, Adam)."""
    params = init_probe(key, x_train.shape[-1])
    opt = optax.adam(lr)
    state = opt.init(params)
    for _ in range(epochs):
        params, state = _adam_step(opt, params, state, x_train, y_train)
    logits = x_val @ params["weight"] + params["bias"]
    accuracy = float(np.mean((np.asarray(jax.nn.sigmoid(logits)) >= 0.5) == (np.asarray(y_val) == 1)))
    return params, accuracy


def test_vmapped_probes_equal_per_head_loop():
    rng = np.random.RandomState(0)
    n, heads, d = 20, 4, 4  # two chunks of two heads: one compiled shape
    pruned = rng.randn(n, heads, d).astype(np.float32)
    component = rng.randn(heads, d).astype(np.float32)
    positive = (rng.randn(n, heads, d) + np.linspace(0, 2, heads)[None, :, None]).astype(np.float32)
    negative = rng.randn(n, heads, d).astype(np.float32)
    config = ProbeConfig(epochs=50, head_chunk=2)
    got = train_probes(pruned, component, positive, negative, config)
    train, val = split_pairs(n)
    for h in range(heads):
        anchor = pruned[:, h] + component[h]
        x_pos, x_neg = np.concatenate([anchor, positive[:, h]], 1), np.concatenate([anchor, negative[:, h]], 1)
        x_train = jnp.asarray(np.concatenate([x_pos[train], x_neg[train]]))
        x_val = jnp.asarray(np.concatenate([x_pos[val], x_neg[val]]))
        y_train = jnp.concatenate([jnp.ones(train.size), jnp.zeros(train.size)])
        y_val = jnp.concatenate([jnp.ones(val.size), jnp.zeros(val.size)])
        key = jax.random.fold_in(jax.random.key(config.init_seed), h)
        params, accuracy = loop_probe(key, x_train, y_train, x_val, y_val, config.epochs, config.learning_rate)
        np.testing.assert_allclose(got.weight[h], np.asarray(params["weight"]), atol=1e-5)
        np.testing.assert_allclose(got.bias[h], np.asarray(params["bias"]), atol=1e-5)
        assert got.accuracy[h] == pytest.approx(accuracy)


def test_informative_heads_rank_first(tmp_path):
    rng = np.random.RandomState(1)
    n, heads, d = 40, 4, 6
    pruned = rng.randn(n, heads, d).astype(np.float32)
    positive = rng.randn(n, heads, d).astype(np.float32)
    negative = rng.randn(n, heads, d).astype(np.float32)
    positive[:, 2, 0] += 8.0  # head 2 separates r+ from r- along one coordinate
    result = train_probes(pruned, np.zeros((heads, d), np.float32), positive, negative)
    assert result.accuracy[2] >= 0.9 and result.ranking[0] == 2
    assert result.train_pairs.size == 28 and result.val_pairs.size == 12
    result.save(tmp_path / "p.npz")
    np.testing.assert_array_equal(ProbeResult.load(tmp_path / "p.npz").ranking, result.ranking)


def test_ranking_breaks_ties_by_val_loss_then_index():
    accuracy = np.array([0.5, 0.9, 0.9, 0.5, 0.9])
    loss = np.array([0.1, 0.4, 0.2, 0.1, 0.2])
    assert rank_heads(accuracy, loss).tolist() == [2, 4, 1, 0, 3]
    assert rank_heads(accuracy).tolist() == [1, 2, 4, 0, 3]
    layers, heads = layer_head(np.array([0, 5, 7]), num_heads=4)
    assert layers.tolist() == [0, 1, 1] and heads.tolist() == [0, 1, 3]


def test_probe_seed_changes_only_the_probes_init():
    """--probe-seed: 0 (the default) is the fixed ranking every --seed shares; another seed redraws the probes'
    init (as the reference's seed does), the split stays sklearn's random_state=42; old job folders, written
    before the setting existed, resume at its default."""
    from lcc_jax.restore import steps
    from lcc_jax.restore.config import RestoreConfig
    from lcc_jax.restore.job_folder import _changes

    rng = np.random.RandomState(3)
    n, heads, d = 30, 5, 4
    pruned, positive, negative = (rng.randn(n, heads, d).astype(np.float32) for _ in range(3))
    component = rng.randn(heads, d).astype(np.float32)

    class Captures:
        def aligned(self):
            return None, positive, negative, pruned

    class Components:
        pass

    Components.component = component
    default = steps.probes(Captures(), Components())
    same = steps.probes(Captures(), Components(), 0)
    other = steps.probes(Captures(), Components(), 1)
    np.testing.assert_array_equal(default.val_loss, same.val_loss)
    np.testing.assert_array_equal(default.val_pairs, other.val_pairs)
    assert not np.allclose(default.val_loss, other.val_loss)
    assert RestoreConfig().probe_seed == 0
    old = {"restore": {"seed": 0}}
    assert _changes(old, {"restore": {"seed": 0, "probe_seed": 0}}) == []
    assert _changes(old, {"restore": {"seed": 0, "probe_seed": 1}}) == ["restore.probe_seed: None -> 1"]


def test_spread_heads_takes_every_layers_best_in_turn_and_excludes_random_heads():
    """--spread-heads: the same probe scores, the top-k taken in rounds over the layers (each layer's best by the
    probes first); without it the probes' top-k, which here sits in one layer. Old job folders resume (the setting
    did not exist) and asking for random and spread heads at once is refused."""
    from lcc_jax.errors import UserError
    from lcc_jax.restore import steps
    from lcc_jax.restore.config import RestoreConfig
    from lcc_jax.restore.job_folder import _changes
    from lcc_jax.restore.probe import ProbeResult

    layers, heads, d = 3, 4, 2
    accuracy = np.zeros(layers * heads)
    accuracy[4:8] = [0.9, 0.95, 0.8, 0.85]  # layer 1 holds the four best heads
    accuracy[[2, 9]] = [0.7, 0.6]  # then layer 0's head 2, layer 2's head 1
    probes = ProbeResult(accuracy=accuracy, val_loss=np.zeros_like(accuracy), weight=None, bias=None,
                         train_pairs=None, val_pairs=None)
    basis = np.broadcast_to(np.eye(d, dtype=np.float32), (layers * heads, d, d))

    class Components:
        pass

    Components.basis = basis
    plain = steps.init(RestoreConfig(top_k=3), Components, probes, layers)
    spread = steps.init(RestoreConfig(top_k=3, spread_heads=True), Components, probes, layers)
    assert np.asarray(plain.heads).tolist() == [5, 4, 7]  # all in layer 1
    assert np.asarray(spread.heads).tolist() == [5, 2, 9]  # layer 1's best, layer 0's best, layer 2's best
    six = steps.init(RestoreConfig(top_k=6, spread_heads=True), Components, probes, layers)
    assert np.asarray(six.heads).tolist() == [5, 2, 9, 4, 0, 8]  # each layer's second best (ties: by index)
    assert not _changes({"restore": {"seed": 0}}, {"restore": {"seed": 0, "spread_heads": False}})
    with pytest.raises(UserError, match="pass one of them"):
        RestoreConfig(spread_heads=True, random_heads=True)
    with pytest.raises(UserError, match="same number of heads in every layer"):
        steps.init(RestoreConfig(top_k=3, spread_heads=True), Components, probes, 5)  # 12 heads, 5 layers
