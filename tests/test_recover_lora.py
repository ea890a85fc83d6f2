"""`lcc_jax.recover_lora`: the masked-LoRA recovery in memory keeps every pruned weight at zero, trains the kept
ones exactly as the recovery benchmark's "masked_lora" cell does, and says when a dense adapter revives weights."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from lcc_jax.sharding import flat_params

TINY = dict(num_train=24, num_probe=16, num_valid=8, max_length=64, epochs=1, batch_size=4)  # tests/test_api.py's
PRUNE = dict(method="wanda", sparsity="0.5", batch_size=4)
CALIBRATION = dict(nsamples=4, seqlen=64)


@pytest.fixture(scope="module")
def pruned_tiny(tiny_model_dir):
    import lcc_jax

    model, tokenizer, _ = lcc_jax.load(tiny_model_dir)
    pruned = lcc_jax.prune(model, tokenizer, lcc_jax.PruneConfig(**PRUNE), in_place=False,
                           calibration=lcc_jax.CalibrationConfig(**CALIBRATION))
    return pruned, tokenizer


def _kernels(model, paths) -> dict[str, np.ndarray]:
    """The pruned kernels (`paths`: the pruning masks' keys) as numpy arrays."""
    return {path: np.asarray(p[...]) for path, p in flat_params(model).items() if path in paths}


def test_masked_recovery_keeps_the_sparsity_and_is_the_benchmarks_masked_lora(pruned_tiny):
    import lcc_jax
    from lcc_jax.baselines import MASKED_LORA, merge_lora, train_lora
    from lcc_jax.restore.steps import training_data

    pruned, tokenizer = pruned_tiny
    before = _kernels(pruned.model, pruned.masks)
    recovery = lcc_jax.recover_lora(pruned, tokenizer, lcc_jax.RestoreConfig(**TINY))

    assert recovery.sparsity.revived == 0 and recovery.sparsity.pruned > 0
    assert recovery.sparsity.surviving == pytest.approx(0.5, abs=0.01)
    assert np.isfinite(recovery.history["loss"]).all() and len(recovery.history["valid_loss"]) == 1
    after = _kernels(recovery.model, pruned.masks)
    assert any(not np.array_equal(after[p], before[p]) for p in before), "training changed no kept weight"
    for path, kernel in _kernels(pruned.model, pruned.masks).items():  # the input model is untouched
        np.testing.assert_array_equal(kernel, before[path])

    # the recovery benchmark's masked_lora cell (benchmark.methods): same data, budget, seed, rate and masks
    config = lcc_jax.RestoreConfig(**TINY)
    train_config = config.train_config(1e-4)
    data = training_data(config, tokenizer)
    result = train_lora(pruned.model, data.epoch_batches(train_config), train_config, MASKED_LORA,
                        jax.random.key(config.seed), masks=pruned.masks, valid_batches=data.valid)
    reference = _kernels(merge_lora(pruned.model, result.trainable, result.setup), pruned.masks)
    for path in after:
        np.testing.assert_array_equal(after[path], reference[path], err_msg=path)
    assert recovery.trainable_params == sum(x.size for x in jax.tree.leaves(result.trainable))


def test_a_dense_adapter_says_how_many_pruned_weights_it_revived(pruned_tiny, caplog):
    import lcc_jax

    pruned, tokenizer = pruned_tiny
    with caplog.at_level(logging.WARNING, logger="lcc_jax.baselines.recover"):
        recovery = lcc_jax.recover_lora(pruned, tokenizer, lcc_jax.RestoreConfig(**TINY), adapter="wanda")
    assert recovery.sparsity.revived > 0 and recovery.sparsity.surviving < recovery.sparsity.target
    assert "revived" in caplog.text and "adapter='masked'" in caplog.text


def test_num_train_alone_may_go_below_the_probing_samples(pruned_tiny):
    """Nothing is probed: `recover_lora(..., num_train=24)` must not ask for --num-probe as RestoreConfig would."""
    import lcc_jax

    pruned, tokenizer = pruned_tiny
    recovery = lcc_jax.recover_lora(pruned, tokenizer, num_train=24, num_valid=8, max_length=64, epochs=1,
                                    batch_size=4, adapter=lcc_jax.baselines.LoraConfig(rank=2, targets=("o",),
                                                                                       masked=True))
    assert recovery.config.num_train == 24 and recovery.sparsity.revived == 0


def test_an_unknown_adapter_is_refused_with_the_choices():
    from lcc_jax.baselines import RecoverError, recover_lora

    with pytest.raises(RecoverError, match=r"unknown adapter 'qlora'.*'masked'"):
        recover_lora(object(), None, adapter="qlora")


def test_a_structured_prune_is_recovered_as_the_benchmark_does_with_nothing_to_mask(tiny_model_dir):
    """FLAP removes heads and channels (its `masks` are {}): the recovery keeps the smaller shapes, masks nothing (no
    stray zero of a kept weight is frozen), and its kernels are the benchmark's LoRA-family path's,
    `train_merged_lora` with the checkpoint's {} masks."""
    import lcc_jax
    from lcc_jax.baselines import MASKED_LORA, train_merged_lora
    from lcc_jax.restore.steps import training_data

    model, tokenizer, _ = lcc_jax.load(tiny_model_dir)
    pruned = lcc_jax.prune(model, tokenizer, lcc_jax.PruneConfig(method="flap", structured=0.2, batch_size=4),
                           in_place=False, calibration=lcc_jax.CalibrationConfig(**CALIBRATION))
    assert pruned.masks == {}
    config = lcc_jax.RestoreConfig(**TINY)
    recovery = lcc_jax.recover_lora(pruned, tokenizer, config)
    assert recovery.sparsity.pruned == 0 and recovery.sparsity.revived == 0
    shapes = {path: p[...].shape for path, p in flat_params(pruned.model).items()}
    assert {path: p[...].shape for path, p in flat_params(recovery.model).items()} == shapes

    train_config = config.train_config(1e-4)
    data = training_data(config, tokenizer)
    reference, _ = train_merged_lora(pruned.model, pruned.masks, data.epoch_batches(train_config), data.valid,
                                     train_config, MASKED_LORA, config.seed, None)
    ours, theirs = flat_params(recovery.model), flat_params(reference)
    for path in ours:
        np.testing.assert_array_equal(np.asarray(ours[path][...]), np.asarray(theirs[path][...]), err_msg=path)
