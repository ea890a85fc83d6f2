"""Checkpoints across topologies: what one mesh saves, another restores, with the same values.

Orbax stores global arrays; each loader places them by the *target* mesh's sharding table. Covered:
the pruned-model checkpoint (model + masks), the Orbax model export, and the trainer's checkpoints
(trainable parameters + optimizer state), each 8 devices -> 1 and 1 -> 8, and a training run
interrupted on 8 devices and finished on 1. (Two processes -> one: tests/test_multihost.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

import lcc_jax
from lcc_jax.checkpoint import load_pruned, save_pruned
from lcc_jax.pruning.masks import masks_from_zeros
from lcc_jax.sharding import flat_params
from model_utils import SMALL_CONFIG, random_model

MESHES = {"fsdp=8": "fsdp=8", "data=2,fsdp=4": "data=2,fsdp=4", "one device": None}


def _mesh(name: str | None):
    return lcc_jax.make_mesh(MESHES[name]) if MESHES[name] else None


def _pruned_model(mesh):
    """A random model whose smallest half of every kernel is zeroed, and its keep-masks."""
    model = random_model(SMALL_CONFIG, mesh=mesh)
    for path, var in flat_params(model).items():
        if path.endswith("kernel"):
            w = np.asarray(jax.device_get(var[...]))
            var.set_value(jax.device_put(np.where(np.abs(w) > np.median(np.abs(w)), w, 0), var[...].sharding))
    return model, masks_from_zeros(model)


def _array(value) -> jax.Array:
    return value[...] if isinstance(value, nnx.Variable) else value


def _values(tree: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(jax.device_get(_array(v))) for k, v in tree.items()}


def _assert_placed(arrays: dict, mesh) -> None:
    """Every array lives on the target: all of `mesh`'s devices, or one device."""
    for path, value in arrays.items():
        value = _array(value)
        if mesh is None:
            assert isinstance(value.sharding, SingleDeviceSharding), path
        else:
            assert isinstance(value.sharding, NamedSharding) and value.sharding.mesh == mesh, path


@pytest.mark.parametrize("source, target", [("fsdp=8", "one device"), ("one device", "data=2,fsdp=4")])
def test_pruned_checkpoint_restores_onto_another_mesh(tmp_path, source, target):
    model, masks = _pruned_model(_mesh(source))
    save_pruned(tmp_path / "pruned", model, None, masks, head_map=np.arange(8).reshape(2, 4), meta={"from": source})
    mesh = _mesh(target)
    restored = load_pruned(tmp_path / "pruned", mesh=mesh)
    _assert_placed(flat_params(restored.model), mesh)
    _assert_placed(restored.masks, mesh)
    expected, got = _values(flat_params(model)), _values(flat_params(restored.model))
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=path)
    for path, keep in _values(masks).items():
        np.testing.assert_array_equal(_values(restored.masks)[path], keep, err_msg=path)
    np.testing.assert_array_equal(restored.head_map, np.arange(8).reshape(2, 4))
    assert restored.meta == {"from": source}


@pytest.mark.parametrize("source, target", [("fsdp=8", "one device"), ("one device", "fsdp=8")])
def test_orbax_export_restores_onto_another_mesh_with_the_same_outputs(tmp_path, source, target):
    model = random_model(SMALL_CONFIG, mesh=_mesh(source))
    lcc_jax.save_orbax(model, None, tmp_path / "model")
    mesh = _mesh(target)
    restored, _, _ = lcc_jax.load(tmp_path / "model", mesh=mesh, tokenizer=False)
    _assert_placed(flat_params(restored), mesh)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, SMALL_CONFIG.vocab_size, (8, 12)))
    np.testing.assert_allclose(np.asarray(restored(tokens).logits), np.asarray(model(tokens).logits), atol=1e-5)


def _trainer_inputs():
    """A frozen tiny model, a bias-only compensation, and fixed batches of 8 rows."""
    from lcc_jax.train import TrainConfig, epoch_batches

    rng = np.random.RandomState(0)
    sequences = [rng.randint(1, SMALL_CONFIG.vocab_size, rng.randint(6, 20)).tolist() for _ in range(32)]
    masks = [[0.0] * 3 + [1.0] * (len(s) - 3) for s in sequences]
    config = TrainConfig(learning_rate=1e-2, epochs=2, batch_size=8, compute_dtype="float32", seed=0,
                         checkpoint_every_steps=1)
    trainable = {"bias": jnp.asarray(rng.normal(0, 1e-3, (SMALL_CONFIG.num_layers, SMALL_CONFIG.num_heads,
                                                           SMALL_CONFIG.head_dim)), jnp.float32)}
    return random_model(SMALL_CONFIG), trainable, epoch_batches(sequences, masks, config, pad_id=0), config


def _apply(model, trainable, tokens, mask):
    return model(tokens, mask, compensation=trainable["bias"].astype(model.dtype)).logits


def test_trainer_checkpoint_saved_on_8_devices_restores_on_1_and_back(tmp_path):
    from lcc_jax.train import make_optimizer
    from lcc_jax.train.state import TrainCheckpointer, TrainProgress

    mesh = _mesh("fsdp=8")
    replicated = NamedSharding(mesh, PartitionSpec())
    trainable = {"beta": jax.device_put(jnp.arange(16.0).reshape(2, 8), replicated),
                 "bias": jax.device_put(jnp.ones((2, 8)), NamedSharding(mesh, PartitionSpec(None, "fsdp")))}
    optimizer = make_optimizer(_trainer_inputs()[3], total_steps=10)
    opt_state = optimizer.init(trainable)
    opt_state = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, opt_state)
    saver = TrainCheckpointer(tmp_path / "ckpt")
    saver.save(trainable, opt_state, TrainProgress(step=3, epoch=1, micro_batch=2))
    saver.close()

    single = jax.tree.map(lambda x: jax.device_put(jnp.zeros_like(x), jax.devices()[0]), (trainable, opt_state))
    loader = TrainCheckpointer(tmp_path / "ckpt")
    got_trainable, got_opt, progress = loader.restore(3, *single)
    loader.close()
    assert (progress.step, progress.epoch, progress.micro_batch) == (3, 1, 2)
    for got, want in zip(jax.tree.leaves((got_trainable, got_opt)), jax.tree.leaves((trainable, opt_state))):
        assert isinstance(got.sharding, SingleDeviceSharding)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    # and back: the single-device copy saved, restored onto the 8-device placement
    saver = TrainCheckpointer(tmp_path / "ckpt1")
    saver.save(got_trainable, got_opt, progress)
    saver.close()
    loader = TrainCheckpointer(tmp_path / "ckpt1")
    back, _, _ = loader.restore(3, trainable, opt_state)
    loader.close()
    assert back["bias"].sharding == trainable["bias"].sharding
    np.testing.assert_array_equal(np.asarray(back["bias"]), np.asarray(trainable["bias"]))


def test_training_interrupted_on_8_devices_finishes_on_1_like_an_uninterrupted_run(tmp_path):
    from lcc_jax.train import fit

    model, trainable, batches, config = _trainer_inputs()
    whole = fit(model, trainable, _apply, batches, config)
    first = fit(model, trainable, _apply, batches, config, checkpoint_dir=str(tmp_path / "ckpt"),
                mesh=_mesh("fsdp=8"), max_steps=3)
    assert first.steps == 3 and not first.finished
    rest = fit(model, trainable, _apply, batches, config, checkpoint_dir=str(tmp_path / "ckpt"))
    assert rest.resumed_from == 3 and rest.finished and rest.steps == whole.steps
    np.testing.assert_allclose(np.asarray(rest.trainable["bias"]), np.asarray(whole.trainable["bias"]), atol=1e-6)
    np.testing.assert_allclose(rest.history["loss"], whole.history["loss"], rtol=1e-5)
