"""What the speed work must not break, and what it promises: packed rows compute what padded rows do,
the attention implementation is chosen as documented, and each batch shape compiles once."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcc_jax.config import ModelConfig
from lcc_jax.data.batching import make_batches, pack_batch
from lcc_jax.models import CausalLM
from lcc_jax.models.attention import (
    AttentionMask,
    attention_implementation,
    packed_rows,
    resolve_attention,
    segment_layout,
)
from lcc_jax.restore.capture import capture_last_token
from lcc_jax.train import TrainConfig, fit, precompile_fit
from lcc_jax.train.losses import next_token_nll
from lcc_jax.train.steps import (
    _STEPS,
    _own_copy,
    _place,
    _step_groups,
    init_state,
    own_layout,
    placed_layout,
    state_layout,
    step_shapes,
)

CONFIG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def model():
    return CausalLM(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 64, rng.integers(4, 20)).tolist() for _ in range(8)]
    masks = [[0.0] * 3 + [1.0] * (len(s) - 3) for s in seqs]
    return seqs, masks


@contextlib.contextmanager
def compiles():
    """Count XLA compilations by function name while the block runs."""
    counts: collections.Counter = collections.Counter()

    class Count(logging.Handler):
        def emit(self, record):
            match = re.match(r"Compiling (\S+)", record.getMessage())
            if match:
                counts[match.group(1)] += 1

    handler, logger = Count(), logging.getLogger("jax")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            yield counts
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_pack_batch_keeps_every_sample_and_never_targets_a_first_token(samples):
    seqs, masks = samples
    batch = make_batches(seqs, 8, pad_id=0, loss_masks=masks, buckets=(32,), order="given")[0]
    packed = pack_batch(batch, rows=2, multiple=16)
    assert packed.tokens.shape[0] == 2 and packed.tokens.shape[1] % 16 == 0
    assert sorted(packed.index.tolist()) == list(range(8)) and packed.max_segments >= 4
    found = []
    for row in range(2):
        seg = packed.attention_mask[row]
        for k in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == k)
            assert np.all(np.diff(where) == 1)  # contiguous
            found.append(packed.tokens[row, where].tolist())
            assert packed.loss_mask[row, where[0]] == 0.0
    assert sorted(found) == sorted(seqs)
    assert packed.loss_mask.sum() == sum(sum(m[1:]) for m in masks)


def test_packed_rows_give_the_logits_and_loss_of_separate_rows(model, samples):
    seqs, masks = samples
    batch = make_batches(seqs, 8, pad_id=0, loss_masks=masks, buckets=(32,), order="given")[0]
    packed = pack_batch(batch, rows=2, multiple=16)
    alone = model(jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask)).logits
    together = model(jnp.asarray(packed.tokens), jnp.asarray(packed.attention_mask)).logits
    lengths = batch.attention_mask.sum(1)
    cursor = {}
    for row in range(2):
        seg = packed.attention_mask[row]
        for k in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == k)
            sample = next(i for i in range(8) if i not in cursor and lengths[i] == where.size
                          and batch.tokens[i, : where.size].tolist() == packed.tokens[row, where].tolist())
            cursor[sample] = True
            np.testing.assert_allclose(np.asarray(together[row, where]), np.asarray(alone[sample, : where.size]),
                                       atol=1e-5, rtol=1e-5)
    dense = next_token_nll(alone, batch.tokens, batch.loss_mask, batch.attention_mask)
    packed_nll = next_token_nll(together, packed.tokens, packed.loss_mask, packed.attention_mask)
    np.testing.assert_allclose(np.asarray(packed_nll), np.asarray(dense), rtol=1e-5)


def test_positions_restart_per_packed_sequence_and_left_padding_keeps_hf_positions():
    segments = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
    positions = AttentionMask(segments).positions()
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]]


def test_segment_layout_is_cudnns_packed_lengths_and_offsets():
    segments = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    lengths, offsets = segment_layout(segments, max_segments=4)
    assert lengths.tolist() == [[3, 2, 1, -1], [4, -1, -1, -1]]
    assert offsets.tolist() == [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1]]


def test_attention_implementation_is_chosen_as_documented(monkeypatch):
    monkeypatch.delenv("LCC_ATTENTION", raising=False)
    assert resolve_attention(None, jnp.bfloat16, 64) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
    assert resolve_attention(None, jnp.float32, 64) == "xla"
    assert resolve_attention("cudnn", jnp.float32, 64) == "cudnn"  # explicit wins
    with attention_implementation("cudnn"):
        assert resolve_attention("auto", jnp.bfloat16, 64) == "cudnn"
        assert resolve_attention("xla", jnp.bfloat16, 64) == "xla"
    monkeypatch.setenv("LCC_ATTENTION", "cudnn")
    assert resolve_attention(None, jnp.float32, 64) == "cudnn"
    with pytest.raises(ValueError, match="implementation"):
        resolve_attention("flash", jnp.bfloat16, 64)
    with pytest.raises(ValueError, match="max_segments"):
        with packed_rows(0):
            pass


def apply_delta(model, trainable, tokens, mask, remat=False):
    return model(tokens, mask, compensation=trainable["delta"], remat=remat).logits


def test_fit_compiles_the_train_step_once_per_shape_and_never_again(model, samples):
    seqs, masks = samples
    config = TrainConfig(epochs=3, batch_size=4, compute_dtype="float32", log_every=2)
    shuffled = lambda epoch: make_batches(seqs, 4, pad_id=0, loss_masks=masks, order="shuffle", seed=epoch)  # noqa: E731
    delta = {"delta": jnp.zeros((2, 4, 8), jnp.float32)}
    with compiles() as counts:
        first = fit(model, delta, apply_delta, shuffled, config, pack_multiple=64)
    # every epoch's two steps pack into one (1, 1, 64) shape: one compilation for all six steps
    assert first.steps == 6 and counts["jit(train_step)"] == 1, counts
    with compiles() as again:
        second = fit(model, delta, apply_delta, shuffled, config, pack_multiple=64)
    assert again["jit(train_step)"] == 0, again  # a repeated run reuses the executable
    np.testing.assert_allclose(second.history["loss"], first.history["loss"], rtol=1e-6)


def test_fit_compiles_every_epochs_shapes_before_training(model, samples, caplog):
    seqs, masks = samples
    config = TrainConfig(epochs=2, batch_size=4, compute_dtype="float32", log_every=2)
    # epoch 1's samples are three times as long: its packed rows need a longer shape than epoch 0's
    longer = [s * 3 for s in seqs], [m * 3 for m in masks]

    def by_epoch(epoch):
        texts, loss_masks = (seqs, masks) if epoch == 0 else longer
        return make_batches(texts, 4, pad_id=0, loss_masks=loss_masks, order="given")

    delta = {"delta": jnp.zeros((2, 4, 8), jnp.float32)}
    with caplog.at_level(logging.INFO, logger="lcc_jax.train.steps"):
        fit(model, delta, apply_delta, by_epoch, config, pack_multiple=16)
    lines = [r.getMessage() for r in caplog.records]
    assert not any("new batch shape" in line for line in lines), lines  # nothing compiled mid-training
    first, later = (step_shapes(list(by_epoch(e)), 1, 1, 16) for e in (0, 1))
    assert later - first, (first, later)  # the case is real: epoch 1 has a shape epoch 0 lacks


@pytest.mark.parametrize("pack_rows, accum", [(None, 1), (1, 1), (2, 2)])
def test_step_shapes_are_the_shapes_step_groups_builds(samples, pack_rows, accum):
    seqs, masks = samples
    batches = make_batches(seqs * 3, 4, pad_id=0, loss_masks=masks * 3, order="shuffle", seed=1)
    built = {arrays["tokens"].shape for arrays, *_ in _step_groups(batches, accum, pack_rows, 16)}
    assert step_shapes(batches, accum, pack_rows, 16) == built


def test_a_fit_compiled_ahead_compiles_nothing_and_trains_the_same(model, samples):
    seqs, masks = samples
    config = TrainConfig(epochs=2, batch_size=4, compute_dtype="float32", learning_rate=3e-3)  # a step of its own
    shuffled = lambda epoch: make_batches(seqs, 4, pad_id=0, loss_masks=masks, order="shuffle", seed=epoch)  # noqa: E731
    delta = {"delta": jnp.zeros((2, 4, 8), jnp.float32)}
    shapes = {"delta": jax.ShapeDtypeStruct((2, 4, 8), jnp.float32)}  # the values need not exist yet
    with compiles() as ahead:
        compiled = precompile_fit(model, shapes, apply_delta, shuffled, config, pack_multiple=16).result()
    assert compiled >= 1 and ahead["jit(train_step)"] == compiled, ahead
    with compiles() as counts:
        trained = fit(model, delta, apply_delta, shuffled, config, pack_multiple=16)
    assert counts["jit(train_step)"] == 0, counts
    _STEPS._kept.clear()  # the same run compiled in fit itself
    again = fit(model, delta, apply_delta, shuffled, config, pack_multiple=16)
    np.testing.assert_array_equal(trained.history["loss"], again.history["loss"])
    np.testing.assert_array_equal(np.asarray(trained.trainable["delta"]), np.asarray(again.trainable["delta"]))


@pytest.mark.parametrize("on_mesh", [False, True])
def test_the_compile_ahead_layouts_are_those_of_the_arrays_fit_makes(on_mesh):
    """precompile_fit makes no array (device work on its thread can break a GPU's first run of a cuDNN program read
    back from the compile cache, which captures a CUDA graph on the compute stream); its layouts must still be
    exactly fit's, or fit compiles the step again."""
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    from lcc_jax.data.device import layout

    mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",)) if on_mesh else None
    sharded = (jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, PartitionSpec("fsdp"))) if on_mesh
               else jnp.ones((8, 4)))
    trainable = {"sharded": sharded, "plain": jnp.ones((3,), jnp.bfloat16)}
    constants = {"table": jnp.arange(6)}
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.linear_schedule(1e-3, 0.0, 10)))
    with jax.set_mesh(mesh) if on_mesh else contextlib.nullcontext():
        params = _own_copy(trainable, mesh)
        expected = (layout(params), layout(_place(constants, mesh)), layout(init_state(optimizer, params)))
        abstract = own_layout(trainable, mesh)
        state = state_layout(optimizer, abstract)
        got = (layout(abstract), layout(placed_layout(constants, mesh)), layout(state))
    assert got == expected
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves((abstract, state)))


def test_fit_beside_a_compile_ahead_compiles_each_shape_once(model, samples):
    seqs, masks = samples
    config = TrainConfig(epochs=2, batch_size=4, compute_dtype="float32", learning_rate=4e-3)
    shuffled = lambda epoch: make_batches(seqs, 4, pad_id=0, loss_masks=masks, order="shuffle", seed=epoch)  # noqa: E731
    delta = {"delta": jnp.zeros((2, 4, 8), jnp.float32)}
    with compiles() as counts:
        ahead = precompile_fit(model, delta, apply_delta, shuffled, config, pack_multiple=16)  # not waited for
        fit(model, delta, apply_delta, shuffled, config, pack_multiple=16)
        ahead.result()
    shapes = len(step_shapes(list(shuffled(0)), 1, 1, 16) | step_shapes(list(shuffled(1)), 1, 1, 16))
    assert counts["jit(train_step)"] == shapes, counts  # whichever thread came first compiled it; the other waited


@contextlib.contextmanager
def persistent_cache(folder):
    """The compile cache on in `folder` for the block, then as it was (the suite runs with it off)."""
    from lcc_jax import compile_cache

    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(folder))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LCC_COMPILE_CACHE", "1")
        try:
            yield compile_cache.enable()
        finally:
            compile_cache.enable(False)
            for name, value in saved.items():
                jax.config.update(name, value)
            from jax.experimental.compilation_cache import compilation_cache
            compilation_cache.reset_cache()


def test_a_step_the_compile_cache_holds_is_left_to_fit(model, samples, tmp_path, caplog):
    """A second job on the same machine reads its train step back in fit, not on the compile-ahead thread beside
    capture (a GPU's cuDNN read-back there failed a warm run): the thread compiles nothing, fit trains the same."""
    seqs, masks = samples
    config = TrainConfig(epochs=1, batch_size=4, compute_dtype="float32", learning_rate=6e-3)
    given = lambda epoch: make_batches(seqs, 4, pad_id=0, loss_masks=masks, order="given")  # noqa: E731
    shapes = {"delta": jax.ShapeDtypeStruct((2, 4, 8), jnp.float32)}
    delta = {"delta": jnp.zeros((2, 4, 8), jnp.float32)}
    with persistent_cache(tmp_path / "jc"):
        assert precompile_fit(model, shapes, apply_delta, given, config).result() >= 1  # first job: compiled ahead
        first = fit(model, delta, apply_delta, given, config)
        _STEPS._kept.clear()  # a new process, as far as compiled steps go
        with caplog.at_level(logging.INFO, logger="lcc_jax.train.ahead"), compiles() as ahead:
            assert precompile_fit(model, shapes, apply_delta, given, config).result() == 0
        assert ahead["jit(train_step)"] == 0, ahead
        assert "is in the compile cache" in caplog.text
        second = fit(model, delta, apply_delta, given, config)  # (across processes: tests/test_compile_cache.py)
        other = dataclasses.replace(config, learning_rate=7e-3)  # another program: compiled ahead again
        assert precompile_fit(model, shapes, apply_delta, given, other).result() >= 1
    np.testing.assert_array_equal(first.history["loss"], second.history["loss"])
    with persistent_cache(tmp_path / "elsewhere"):  # an empty cache: nothing is remembered
        _STEPS._kept.clear()
        assert precompile_fit(model, shapes, apply_delta, given, config).result() >= 1


def test_a_step_description_is_the_same_in_every_process(model, samples):
    """The note's key names nothing that differs between processes (object addresses, ids)."""
    from lcc_jax.train.ahead import cast_for_compute, plan_fit, step_description

    seqs, masks = samples
    config = TrainConfig(epochs=2, batch_size=4, compute_dtype="float32")
    given = lambda epoch: make_batches(seqs, 4, pad_id=0, loss_masks=masks, order="given")  # noqa: E731
    plan = plan_fit(given, config, None, True, None)
    frozen = cast_for_compute(model, jnp.float32, abstract_only=True)[1]
    params = own_layout({"delta": jax.ShapeDtypeStruct((2, 4, 8), jnp.float32)}, None)
    text = step_description(model, apply_delta, plan, (frozen, None), params, 0)
    assert " at 0x" not in text and "apply_delta" in text and "CausalLM" in text
    assert text == step_description(model, apply_delta, plan_fit(given, config, None, True, None),
                                    (cast_for_compute(model, jnp.float32, abstract_only=True)[1], None), params, 0)
    later = plan_fit(given, dataclasses.replace(config, epochs=3), None, True, None)  # a longer schedule
    assert step_description(model, apply_delta, later, (frozen, None), params, 0) != text


def test_a_failed_compile_ahead_is_logged_and_fit_still_trains(model, samples, caplog):
    seqs, masks = samples
    config = TrainConfig(epochs=1, batch_size=4, compute_dtype="float32", learning_rate=5e-3)
    given = lambda epoch: make_batches(seqs, 4, pad_id=0, loss_masks=masks, order="given")  # noqa: E731
    wrong = {"delta": jax.ShapeDtypeStruct((3, 4, 8), jnp.float32)}  # not the model's (layers, heads, head_dim)
    with caplog.at_level(logging.WARNING, logger="lcc_jax.train.trainer"):
        assert precompile_fit(model, wrong, apply_delta, given, config).result() == 0
    assert "compiling the train step ahead of time failed" in caplog.text
    result = fit(model, {"delta": jnp.zeros((2, 4, 8), jnp.float32)}, apply_delta, given, config)
    assert result.finished


def test_packed_and_padded_training_agree(model, samples):
    seqs, masks = samples
    config = TrainConfig(epochs=1, batch_size=4, compute_dtype="float32", learning_rate=1e-2)
    given = lambda epoch: make_batches(seqs, 4, pad_id=0, loss_masks=masks, buckets=(32,), order="given")  # noqa: E731
    delta = {"delta": 1e-3 * jnp.ones((2, 4, 8), jnp.float32)}
    packed = fit(model, delta, apply_delta, given, config)
    padded = fit(model, delta, apply_delta, given, config, pack=False)
    np.testing.assert_allclose(packed.history["loss"], padded.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(packed.trainable["delta"]), np.asarray(padded.trainable["delta"]),
                               atol=1e-6)
    assert packed.tokens_seen == padded.tokens_seen


def test_capture_compiles_each_bucket_once_across_calls(model, samples):
    seqs, _ = samples
    with compiles() as counts:
        first = capture_last_token(model, seqs, 4, buckets=(16, 32))
    # at most one per bucket shape (an earlier test in the same process may have compiled one already)
    assert counts["jit(run)"] <= 2, counts
    with compiles() as again:
        second = capture_last_token(model, seqs[::-1], 4, buckets=(16, 32))
    assert again["jit(run)"] == 0, again  # the second call reuses both executables
    np.testing.assert_array_equal(first[::-1], second)
