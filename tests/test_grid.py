"""Grid training: R restorations trained side by side end exactly where R single `fit` runs end."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from lcc_jax.baselines.bias_only import apply_compensation, head_bias, train_compensation
from lcc_jax.config import ModelConfig
from lcc_jax.data.batching import make_batches
from lcc_jax.models import CausalLM
from lcc_jax.restore.compensation import init_compensation, restrict_span
from lcc_jax.restore.grid import GridMember, fit_grid, grid_delta, grid_valid_loss, stack_members
from lcc_jax.sharding import make_mesh
from lcc_jax.train import TrainConfig, epoch_batches, evaluate
from model_utils import completion_rows

CONFIG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)
TOTAL, D = CONFIG.total_heads, CONFIG.head_dim
TRAIN = TrainConfig(epochs=2, batch_size=4, compute_dtype="float32", log_every=2)


@pytest.fixture(scope="module")
def model():
    return CausalLM(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def data():
    return completion_rows(12, prompt_len=(3, 12), response_len=(4, 16),
                           response_tokens=[1, 2, 3, 1, 2, 3, 40])


@pytest.fixture(scope="module")
def basis():
    """A random orthonormal basis per head (rows), as lost_components gives with N >= d."""
    q = np.linalg.qr(np.random.default_rng(1).normal(size=(TOTAL, D, D)))[0]
    return np.swapaxes(q, 1, 2).astype(np.float32)


def _members(basis):
    ranking = np.random.default_rng(2).permutation(TOTAL)
    full = init_compensation(basis, ranking, 3, jax.random.key(0))
    other = head_bias(ranking[-2:], CONFIG, jax.random.key(1))  # LoFiT-style bias step on other heads
    span = restrict_span(init_compensation(basis, ranking, 4, jax.random.key(2), mode="no_bias"), 2)
    return [
        GridMember("full", full, 1e-2, seed=1),
        GridMember("bias", other, 5e-2, seed=2),
        GridMember("span", span, 3e-2, seed=1),
    ]


def _batches_for(data, config):
    seqs, masks = data
    return lambda seed: epoch_batches(seqs, masks, dataclasses.replace(config, seed=seed), pad_id=0)


@pytest.mark.parametrize("pack, epochs", [(True, 2), (False, 1)])
def test_grid_members_equal_single_runs(model, data, basis, pack, epochs):
    members = _members(basis)
    seqs, masks = data
    valid = make_batches(seqs[:8], 4, pad_id=0, loss_masks=masks[:8], order="length")
    train = dataclasses.replace(TRAIN, epochs=epochs)
    results = fit_grid(model, members, _batches_for(data, train), train, valid_batches=valid, pack=pack)
    for m, got in zip(members, results):
        single_config = dataclasses.replace(train, learning_rate=m.learning_rate, seed=m.seed)
        want, single = train_compensation(model, m.compensation, _batches_for(data, train)(m.seed), single_config,
                                          valid_batches=valid, pack=pack)
        assert got.name == m.name and got.steps == single.steps
        np.testing.assert_allclose(got.compensation.beta, want.beta, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(got.compensation.bias, want.bias, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(got.history["loss"], single.history["loss"], rtol=1e-4)
        np.testing.assert_allclose(got.history["valid_loss"], single.history["valid_loss"], rtol=1e-4)
        # the member really learned: its parameters moved far beyond the 1e-3 init
        moved = np.abs(np.asarray(got.compensation.delta()) - np.asarray(m.compensation.delta())).max()
        assert moved > 1e-2


def test_members_do_not_leak_into_each_other(model, data, basis):
    """Changing one member's learning rate leaves every other member's result untouched."""
    members = _members(basis)
    config = dataclasses.replace(TRAIN, epochs=1)
    base = fit_grid(model, members, _batches_for(data, config), config)
    changed = [members[0], dataclasses.replace(members[1], learning_rate=0.5), members[2]]
    other = fit_grid(model, changed, _batches_for(data, config), config)
    np.testing.assert_allclose(base[0].compensation.beta, other[0].compensation.beta, rtol=1e-6)
    np.testing.assert_allclose(base[2].compensation.beta, other[2].compensation.beta, rtol=1e-6)
    assert not np.allclose(base[1].compensation.bias, other[1].compensation.bias)


def test_stack_masks_follow_mode_and_span(basis):
    members = _members(basis)
    trainable, constants = stack_members(members, CONFIG)
    full, bias, span = (m.compensation for m in members)
    assert constants["beta_mask"][0].sum() == 3 * D and constants["bias_mask"][0].sum() == 3 * D
    assert constants["beta_mask"][1].sum() == 0 and constants["bias_mask"][1].sum() == 2 * D
    assert constants["beta_mask"][2].sum() == 4 * 2 and constants["bias_mask"][2].sum() == 0
    delta = np.asarray(grid_delta(trainable, constants))
    for i, comp in enumerate((full, bias, span)):
        np.testing.assert_allclose(delta[i][np.asarray(comp.heads)], comp.delta(), rtol=1e-5, atol=1e-7)
        untouched = np.setdiff1d(np.arange(TOTAL), np.asarray(comp.heads))
        assert not delta[i][untouched].any()


def test_members_with_different_bases_on_one_head_are_refused(basis):
    ranking = np.arange(TOTAL)
    a = init_compensation(basis, ranking, 2, jax.random.key(0))
    b = init_compensation(basis[::-1].copy(), ranking, 2, jax.random.key(0))
    with pytest.raises(ValueError, match="share one basis"):
        stack_members([GridMember("a", a, 1e-3, 0), GridMember("b", b, 1e-3, 0)], CONFIG)


def test_grid_valid_loss_matches_evaluate(model, data, basis):
    members = _members(basis)
    seqs, masks = data
    valid = make_batches(seqs, 4, pad_id=0, loss_masks=masks, order="length")
    trainable, constants = stack_members(members, CONFIG)
    losses = grid_valid_loss(model, jax.tree.map(np.asarray, trainable), constants, valid, TRAIN, members_per_pass=2)
    for m, got in zip(members, losses):
        from lcc_jax.restore.compensation import split_trainable

        t, frozen = split_trainable(m.compensation)
        want = evaluate(model, t, apply_compensation, valid, constants=frozen)
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_grid_on_a_mesh_matches_one_device(model, data, basis):
    members = _members(basis)[:2]
    config = dataclasses.replace(TRAIN, epochs=1)
    plain = fit_grid(model, members, _batches_for(data, config), config)
    mesh = make_mesh("data=2", devices=jax.devices()[:2])
    sharded = fit_grid(model, members, _batches_for(data, config), config, mesh=mesh)
    for a, b in zip(plain, sharded):
        np.testing.assert_allclose(a.compensation.bias, b.compensation.bias, rtol=1e-4, atol=1e-6)


def test_grid_refuses_bfloat16_parameters():
    from lcc_jax.restore.grid import fit_grid
    from lcc_jax.train import TrainConfig

    with pytest.raises(ValueError, match="float32 parameters only"):
        fit_grid(None, [object()], lambda seed: None, TrainConfig(param_dtype="bfloat16"))
