"""The backward pass stops at the lowest compensated layer: same loss, gradients and fitted parameters as the
full backward pass, for single compensations (lowest layer first, middle, last) and for grids, with less work."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lcc_jax.restore.grid as grid
from lcc_jax.baselines.bias_only import apply_compensation, head_bias, train_compensation
from lcc_jax.config import ModelConfig
from lcc_jax.models import CausalLM
from lcc_jax.restore.compensation import init_compensation, lowest_layer, split_trainable
from lcc_jax.restore.grid import GridMember, fit_grid
from lcc_jax.train import TrainConfig, epoch_batches, fit
from lcc_jax.train.losses import next_token_nll
from model_utils import completion_rows

CONFIG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4,
                     num_heads=4, num_kv_heads=2, head_dim=8)
H, D = CONFIG.num_heads, CONFIG.head_dim
TRAIN = TrainConfig(learning_rate=1e-2, epochs=1, batch_size=4, compute_dtype="float32", log_every=2)
HEAD_SETS = {  # lowest layer: 0 (no cut), a middle one, the last
    "layer0": [1, 5, 14],
    "middle": [9, 6, 15],
    "last": [12, 15],
}


@pytest.fixture(scope="module")
def model():
    return CausalLM(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def data():
    return completion_rows(8, prompt_len=(3, 10), response_len=(4, 12),
                           response_tokens=[1, 2, 3, 40])


@pytest.fixture(scope="module")
def basis():
    q = np.linalg.qr(np.random.default_rng(1).normal(size=(CONFIG.total_heads, D, D)))[0]
    return np.swapaxes(q, 1, 2).astype(np.float32)


def _comp(basis, heads, seed=0):
    """A compensation on exactly `heads`, large enough (std 0.1) that every head matters."""
    ranking = np.r_[heads, [h for h in range(CONFIG.total_heads) if h not in heads]]
    return init_compensation(basis, ranking, len(heads), jax.random.key(seed), std=0.1)


def _batch():
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 12)), jnp.int32)
    mask = jnp.ones((2, 12), jnp.int32).at[1, 9:].set(0)
    return tokens, mask, mask.astype(jnp.float32)


def _loss_and_grads(model, comp, cuts, remat):
    """[(loss, gradients) at each cut in `cuts`], from one compiled function."""
    trainable, frozen = split_trainable(comp)
    tokens, mask, loss_mask = _batch()

    def loss(t, cut):
        logits = apply_compensation(model, t, tokens, mask, constants=frozen, remat=remat, stop_backward_at=cut)
        total, n = next_token_nll(logits, tokens, loss_mask, mask)
        return total / n

    return jax.jit(lambda t: [jax.value_and_grad(loss)(t, cut) for cut in cuts])(trainable)


def test_lowest_layer_is_the_lowest_compensated_layer(basis):
    assert [lowest_layer(_comp(basis, heads), CONFIG) for heads in HEAD_SETS.values()] == [0, 1, 3]
    assert lowest_layer(dataclasses.replace(_comp(basis, [3]), heads=jnp.zeros((0,), jnp.int32)), CONFIG) == 4


@pytest.mark.parametrize("name, remat", [("layer0", False), ("middle", False), ("middle", True), ("last", False),
                                         ("last", True)])
def test_cut_gives_the_loss_and_gradients_of_the_full_backward(model, basis, name, remat):
    comp = _comp(basis, HEAD_SETS[name])
    (full_loss, full_grads), (cut_loss, cut_grads) = _loss_and_grads(model, comp, (0, lowest_layer(comp, CONFIG)),
                                                                      remat)
    np.testing.assert_allclose(cut_loss, full_loss, rtol=1e-6)
    for key in full_grads:
        assert np.abs(full_grads[key]).min() > 0  # every head gets a gradient
        np.testing.assert_allclose(cut_grads[key], full_grads[key], rtol=1e-5, atol=1e-8)


def test_a_cut_above_a_compensated_head_leaves_the_forward_and_freezes_that_head(model, basis):
    comp = _comp(basis, HEAD_SETS["middle"])  # heads 9 and 6 in layers 2 and 1, 15 in layer 3
    (full_loss, full), (loss, grads) = _loss_and_grads(model, comp, (0, 2), False)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    beta, full_beta = np.asarray(grads["beta"]), np.asarray(full["beta"])
    assert not np.any(beta[1]) and np.any(beta[0])  # head 6 (layer 1) is below the cut
    np.testing.assert_allclose(beta[[0, 2]], full_beta[[0, 2]], rtol=1e-5, atol=1e-8)


def test_capture_through_a_cut_model_is_unchanged(model, basis):
    tokens, mask, _ = _batch()
    delta = jnp.asarray(np.random.default_rng(4).normal(size=(CONFIG.num_layers, H, D)), jnp.float32)
    want = model(tokens, mask, compensation=delta, capture="all")
    for cut in (1, CONFIG.num_layers):
        got = model(tokens, mask, compensation=delta, capture="all", stop_backward_at=cut)
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.heads, want.heads, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="stop_backward_at"):
        model(tokens, mask, stop_backward_at=CONFIG.num_layers + 1)


@pytest.mark.slow
def test_cut_does_less_work_and_holds_no_copy_of_the_weights():
    """One gradient runs L layers forward and L - cut backward (2L without the cut), and takes no more temporary
    memory (the weights are indexed out of the stack, not sliced)."""
    config = dataclasses.replace(CONFIG, hidden_size=128, intermediate_size=256, num_heads=8, num_kv_heads=8,
                                 head_dim=16)
    big = CausalLM(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(big)
    tokens = jnp.zeros((1, 8), jnp.int32)
    delta = jnp.zeros((config.num_layers, config.num_heads, config.head_dim), jnp.float32)

    def grad(cut, remat):
        def loss(d, state):
            return jnp.sum(nnx.merge(graphdef, state)(tokens, compensation=d, remat=remat, stop_backward_at=cut).logits)

        return jax.grad(loss)

    for remat in (False, True):
        layers = config.num_layers
        assert _layer_iterations(jax.make_jaxpr(grad(0, remat))(delta, state).jaxpr) == 2 * layers
        assert _layer_iterations(jax.make_jaxpr(grad(3, remat))(delta, state).jaxpr) == layers + (layers - 3)
        # at cut 2 (two layers differentiated; XLA inlines a one-iteration loop, and its slices then copy one
        # layer's weights); a sliced stack would copy the two layers' weights, here far more than the activations
        full, cut = (jax.jit(grad(c, remat)).lower(delta, state).compile() for c in (0, 2))
        assert cut.memory_analysis().temp_size_in_bytes <= full.memory_analysis().temp_size_in_bytes


def _layer_iterations(jaxpr) -> int:
    """Iterations of all scans (over layers) in `jaxpr`, outside scan bodies."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            total += eqn.params["length"]
            continue
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                total += _layer_iterations(inner)
    return total


def _batches(data, seed=0):
    seqs, masks = data
    return epoch_batches(seqs, masks, dataclasses.replace(TRAIN, seed=seed), pad_id=0)


@pytest.mark.parametrize("name", ["middle", "last"])
def test_fit_with_the_cut_ends_where_the_full_backward_ends(model, data, basis, name):
    comp = _comp(basis, HEAD_SETS[name])
    trainable, frozen = split_trainable(comp)
    runs = [fit(model, trainable, apply_compensation, _batches(data), TRAIN, constants=frozen, stop_backward_at=cut)
            for cut in (0, lowest_layer(comp, CONFIG))]
    np.testing.assert_allclose(runs[1].history["loss"], runs[0].history["loss"], rtol=1e-5)
    for key in trainable:
        np.testing.assert_allclose(runs[1].trainable[key], runs[0].trainable[key], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_grid_cuts_at_the_lowest_member_and_matches_the_full_backward(model, data, basis, monkeypatch):
    members = [
        GridMember("middle", _comp(basis, HEAD_SETS["middle"]), 1e-2, seed=1),
        GridMember("last", _comp(basis, HEAD_SETS["last"], seed=1), 2e-2, seed=2),
        GridMember("bias", head_bias([10, 13], CONFIG, jax.random.key(2), std=0.1), 3e-2, seed=1),
    ]
    cuts = []
    real_step = grid._grid_step

    def spy(*args):
        cuts.append(args[-1])
        return real_step(*args)

    monkeypatch.setattr(grid, "_grid_step", spy)
    cut = fit_grid(model, members, lambda s: _batches(data, s), TRAIN)
    monkeypatch.setattr(grid, "lowest_layer", lambda comp, config: 0)
    full = fit_grid(model, members, lambda s: _batches(data, s), TRAIN)
    assert cuts == [1, 0]  # min over members (layers 1, 3, 2), then the patched full backward
    for got, want in zip(cut, full):
        np.testing.assert_allclose(got.history["loss"], want.history["loss"], rtol=1e-5)
        np.testing.assert_allclose(got.compensation.beta, want.compensation.beta, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got.compensation.bias, want.compensation.bias, rtol=1e-5, atol=1e-7)


def test_train_compensation_cuts_by_default(model, data, basis, monkeypatch):
    import lcc_jax.baselines.bias_only as bias_only

    seen = {}
    real_fit = bias_only.fit

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(bias_only, "fit", spy)
    train_compensation(model, _comp(basis, HEAD_SETS["last"]), _batches(data), dataclasses.replace(TRAIN, epochs=1),
                       max_steps=1)
    assert seen["stop_backward_at"] == 3
