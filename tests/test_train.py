"""The shared trainer: learning, frozen weights, the loss, gradient accumulation, resumption, meshes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcc_jax.config import ModelConfig
from lcc_jax.data.batching import make_batches
from lcc_jax.models import CausalLM
from lcc_jax.sharding import flat_params, make_mesh
from lcc_jax.train import TrainConfig, epoch_batches, evaluate, fit, hf_linear_lr
from lcc_jax.train.losses import mean_next_token_nll, next_token_nll
from model_utils import completion_rows

CONFIG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)
COMP_SHAPE = (CONFIG.num_layers, CONFIG.num_heads, CONFIG.head_dim)
BUCKETS = (32,)  # one bucket: one compilation per step function


def apply_comp(model, trainable, tokens, attention_mask, remat=False):
    """RestoreLCC's door with a dense (layers, heads, head_dim) compensation as the trainable."""
    return model(tokens, attention_mask, compensation=trainable["delta"], remat=remat).logits


@pytest.fixture(scope="module")
def model():
    return CausalLM(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def data():
    """Random prompts, then responses drawn mostly from tokens 1-3: a per-head shift can learn them."""
    return completion_rows(16, prompt_len=(3, 12), response_len=(4, 16),
                           response_tokens=[1, 2, 3, 1, 2, 3, 1, 2, 3, 40])


def _given(data, batch_size):
    seqs, masks = data
    return lambda epoch: make_batches(seqs, batch_size, pad_id=0, loss_masks=masks, buckets=BUCKETS, order="given")


def _init():
    return {"delta": 1e-3 * jax.random.normal(jax.random.key(1), COMP_SHAPE, jnp.float32)}


def _params(model):
    return {k: np.asarray(v[...]) for k, v in flat_params(model).items()}


def _assert_trees_equal(a, b, atol=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


FP32 = TrainConfig(learning_rate=1e-2, epochs=2, batch_size=4, compute_dtype="float32", log_every=4)


@pytest.fixture(scope="module")
def uninterrupted(model, data):
    """The reference run that the resumed, accumulated and sharded runs must reproduce."""
    return fit(model, _init(), apply_comp, _given(data, 4), FP32)


def test_fit_lowers_the_loss_and_never_touches_the_model(model, data):
    seqs, masks = data
    config = TrainConfig(learning_rate=5e-2, epochs=3, batch_size=8, log_every=2)  # bf16 compute, the default
    before = _params(model)
    init = _init()
    valid = make_batches(seqs, 8, pad_id=0, loss_masks=masks, buckets=BUCKETS, order="length")
    start = evaluate(model, init, apply_comp, valid, compute_dtype="bfloat16")
    result = fit(model, init, apply_comp, epoch_batches(seqs, masks, config, pad_id=0, buckets=BUCKETS), config,
                 valid_batches=valid)
    assert result.steps == 6 and result.finished and len(result.history["loss"]) == 6
    assert len(result.history["valid_loss"]) == 3
    # a random tiny model's logits span little (lm_head ~ N(0, 0.02)), so the loss can only move a bit
    valid_losses = [start, *result.history["valid_loss"]]
    assert all(b < a for a, b in zip(valid_losses, valid_losses[1:])), valid_losses
    assert valid_losses[-1] < start - 0.03, valid_losses
    assert result.history["loss"][-1] < result.history["loss"][0]
    assert result.trainable["delta"].dtype == jnp.float32  # fp32 master copy under bf16 compute
    assert result.tokens_seen == 3 * sum(sum(m[1:]) for m in masks)
    after = _params(model)
    assert all(np.array_equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    np.testing.assert_array_equal(np.asarray(init["delta"]), np.asarray(_init()["delta"]))  # not donated away


def test_step_loss_is_the_mean_nll_over_target_tokens(model, data, uninterrupted):
    batch = _given(data, 4)(0)[0]
    delta = np.asarray(_init()["delta"])
    logits = np.asarray(model(jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask),
                              compensation=jnp.asarray(delta)).logits, np.float64)  # (4, 32, vocab)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll, count = 0.0, 0
    for row in range(4):
        for t in range(1, batch.tokens.shape[1]):
            if batch.loss_mask[row, t]:  # target token t, predicted at position t-1
                nll -= logp[row, t - 1, batch.tokens[row, t]]
                count += 1
    assert count == int(batch.loss_mask[:, 1:].sum())
    np.testing.assert_allclose(uninterrupted.history["loss"][0], nll / count, rtol=1e-5)
    total, n = next_token_nll(jnp.asarray(logits, jnp.float32), batch.tokens, batch.loss_mask, batch.attention_mask)
    np.testing.assert_allclose(float(total), nll, rtol=1e-5)
    assert int(n) == count
    assert float(mean_next_token_nll(jnp.zeros((1, 3, 5)), jnp.zeros((1, 3), int), jnp.zeros((1, 3)))) == 0.0


def test_schedule_is_hf_linear_with_warmup(uninterrupted):
    total = uninterrupted.steps
    np.testing.assert_allclose(uninterrupted.history["lr"], [1e-2 * (total - s) / total for s in range(total)])
    warm = TrainConfig(learning_rate=1.0, warmup_steps=2)
    assert [float(hf_linear_lr(s, 6, warm, np)) for s in range(7)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]


def test_grad_accum_two_of_two_equals_batch_four(model, data, uninterrupted):
    config = dataclasses.replace(FP32, batch_size=2, grad_accum=2)
    accumulated = fit(model, _init(), apply_comp, _given(data, 2), config)
    assert accumulated.steps == uninterrupted.steps == 8
    assert accumulated.tokens_seen == uninterrupted.tokens_seen
    np.testing.assert_allclose(accumulated.history["loss"], uninterrupted.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(accumulated.history["grad_norm"], uninterrupted.history["grad_norm"], rtol=1e-4)
    _assert_trees_equal(accumulated.trainable, uninterrupted.trainable, atol=1e-5)


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_ends_with_the_same_parameters(model, data, uninterrupted, tmp_path):
    config = dataclasses.replace(FP32, checkpoint_every_steps=3)  # checkpoints at 3, 4 (epoch end), 6

    def crash_at_7(step, epoch):
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        fit(model, _init(), apply_comp, _given(data, 4), config, checkpoint_dir=tmp_path, callback=crash_at_7)
    resumed = fit(model, _init(), apply_comp, _given(data, 4), config, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 6 and resumed.steps == 8 and resumed.finished  # mid-epoch 2
    _assert_trees_equal(resumed.trainable, uninterrupted.trainable)
    assert resumed.history["loss"] == uninterrupted.history["loss"]
    assert resumed.tokens_seen == uninterrupted.tokens_seen

    again = fit(model, _init(), apply_comp, _given(data, 4), config, checkpoint_dir=tmp_path)  # finished: no work
    assert again.resumed_from == 8 and again.steps == 8
    _assert_trees_equal(again.trainable, uninterrupted.trainable)
    with pytest.raises(ValueError, match="different run"):
        fit(model, _init(), apply_comp, _given(data, 4), dataclasses.replace(config, learning_rate=0.5),
            checkpoint_dir=tmp_path)


def test_max_steps_stops_and_a_second_call_finishes_the_run(model, data, uninterrupted, tmp_path):
    first = fit(model, _init(), apply_comp, _given(data, 4), FP32, checkpoint_dir=tmp_path, max_steps=2)
    assert first.steps == 2 and not first.finished
    rest = fit(model, _init(), apply_comp, _given(data, 4), FP32, checkpoint_dir=tmp_path)
    assert rest.resumed_from == 2 and rest.finished
    _assert_trees_equal(rest.trainable, uninterrupted.trainable)


def apply_scaled(model, trainable, tokens, attention_mask, *, constants, remat=False):
    """A frozen extra array (like RestoreLCC's basis) enters as `constants`, not as a closed-over constant."""
    delta = trainable["delta"] * constants["scale"]
    return model(tokens, attention_mask, compensation=delta, remat=remat).logits


def test_fit_on_a_mesh_of_eight_devices_matches_one_device(model, data, uninterrupted):
    assert len(jax.devices()) == 8
    mesh = make_mesh("data=1,fsdp=2,tensor=4")  # rows over 2 devices; embed over 2, heads / vocab / mlp over 4
    constants = {"scale": jnp.ones(COMP_SHAPE)}
    meshes_seen = []

    def apply_recording(model, trainable, tokens, attention_mask, *, constants, remat=False):
        # the steps compile in threads; each must trace under the mesh, or the model's sharding
        # constraints are silently skipped (seen on two H200s: cuDNN attention refused under fsdp)
        meshes_seen.append(jax.sharding.get_abstract_mesh().axis_names)
        return apply_scaled(model, trainable, tokens, attention_mask, constants=constants, remat=remat)

    sharded = fit(model, _init(), apply_recording, _given(data, 4), FP32, mesh=mesh, constants=constants)
    assert meshes_seen and set(meshes_seen) == {mesh.axis_names}
    assert sharded.trainable["delta"].sharding.mesh == mesh
    np.testing.assert_allclose(sharded.history["loss"], uninterrupted.history["loss"], rtol=1e-5)
    _assert_trees_equal(sharded.trainable, uninterrupted.trainable, atol=1e-5)
    with pytest.raises(ValueError, match="do not split over the mesh's 8 batch shards"):
        fit(model, _init(), apply_scaled, _given(data, 4), FP32, mesh=make_mesh(), constants=constants)


def test_config_checks_and_the_remat_switch():
    from lcc_jax.train.steps import _remat_kwargs

    with pytest.raises(ValueError, match="compute_dtype"):
        TrainConfig(compute_dtype="float16")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    assert TrainConfig().weight_decay == 0.0 and TrainConfig().max_grad_norm == 1.0
    assert _remat_kwargs(apply_comp, True) == {"remat": True}
    assert _remat_kwargs(lambda m, t, x, a: None, True) == {}  # warns, trains without remat


def test_bfloat16_parameters_train_like_the_reference_and_lose_tiny_updates(model, data, uninterrupted):
    """param_dtype="bfloat16" keeps the trainable, its gradients and AdamW's moments in bf16, as the reference
    RestoreLCC code trains its compensation: close to the fp32 run, and an update below bf16's spacing is lost."""
    bf16 = dataclasses.replace(FP32, param_dtype="bfloat16")
    result = fit(model, _init(), apply_comp, _given(data, 4), bf16)
    assert result.trainable["delta"].dtype == jnp.bfloat16 and result.finished
    np.testing.assert_allclose(result.history["loss"][0], uninterrupted.history["loss"][0], rtol=1e-3)
    ours, ref = np.asarray(result.trainable["delta"], np.float32), np.asarray(uninterrupted.trainable["delta"])
    assert np.abs(ours - ref).max() < 0.05 * np.abs(ref).max(), (np.abs(ours - ref).max(), np.abs(ref).max())
    # at 1.0 bf16's spacing is 2^-7; AdamW's first steps move a parameter by about the learning rate, 1e-4
    ones = {"delta": jnp.ones(COMP_SHAPE, jnp.float32)}
    tiny = dataclasses.replace(FP32, learning_rate=1e-4, epochs=1)
    lost = fit(model, ones, apply_comp, _given(data, 4), dataclasses.replace(tiny, param_dtype="bfloat16"))
    kept = fit(model, ones, apply_comp, _given(data, 4), tiny)
    assert np.all(np.asarray(lost.trainable["delta"], np.float32) == 1.0)
    assert np.abs(np.asarray(kept.trainable["delta"]) - 1.0).max() > 1e-4
    with pytest.raises(ValueError, match="param_dtype"):
        TrainConfig(param_dtype="float16")


def test_restore_config_passes_param_dtype_and_old_job_folders_resume():
    from lcc_jax.errors import UserError
    from lcc_jax.restore.config import RestoreConfig
    from lcc_jax.restore.job_folder import _changes

    assert RestoreConfig().train_config().param_dtype == "float32"
    assert RestoreConfig(param_dtype="bfloat16").train_config().param_dtype == "bfloat16"
    with pytest.raises(UserError, match="--param-dtype"):
        RestoreConfig(param_dtype="fp16")
    old = {"restore": {"seed": 0}}
    assert _changes(old, {"restore": {"seed": 0, "param_dtype": "float32"}}) == []
    assert _changes(old, {"restore": {"seed": 0, "param_dtype": "bfloat16"}}) == ["restore.param_dtype: None -> 'bfloat16'"]
