"""The shared batched runner: bucket ladders and their cost, padding masks, rows over 8 devices, prefetch order,
one compile per shape (also across runners); and the pieces it shares with the trainer (`lcc_jax.data.device`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lcc_jax.data.batching import make_batches
from lcc_jax.data.device import Executables, check_rows, prefetch_with, row_sharding, xla_fallback
from lcc_jax.data.runner import (
    Runner,
    batch_rows,
    choose_buckets,
    ladder,
    padded_shapes,
    shape_cost,
)
from lcc_jax.sharding import make_mesh


class Scale(nnx.Module):
    def __init__(self):
        self.weight = nnx.Param(jnp.asarray(2.0, jnp.float32))


TRACES: list[tuple] = []


def masked_sum(model, arrays, model_kwargs):
    """(batch,) weight * sum of the real tokens (+ an optional offset): padding must not count."""
    TRACES.append(arrays["tokens"].shape)
    real = arrays["tokens"] * arrays["mask"]
    return model.weight * real.sum(-1).astype(jnp.float32) + model_kwargs.get("offset", 0.0)


def run_sums(model, sequences, batch_size=4, mesh=None, buckets=(8, 16, 32), **kwargs):
    batches = make_batches(sequences, batch_rows(batch_size, mesh), pad_id=7, buckets=buckets, order="length")
    out = np.zeros(len(sequences), np.float32)
    seen = []

    def collect(index, sums):
        seen.append(tuple(index))
        out[index[index >= 0]] = sums[index >= 0]
        return int((index >= 0).sum())

    runner = Runner(model, masked_sum, mesh=mesh, **kwargs)
    stats = runner.run([(b.index, dict(tokens=b.tokens, mask=b.attention_mask)) for b in batches], collect)
    return out, stats, seen, batches, runner


def sequences(seed=0, lengths=(3, 30, 9, 17, 5, 12, 30, 1, 8, 20)):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 50, n).astype(np.int32) for n in lengths]


def test_ladder_and_its_cost():
    assert ladder(2048) == (16, 32, 48, 64, 80, 112, 144, 192, 240, 304, 384, 480, 608, 768, 960, 1200, 1504,
                            1888, 2048)
    assert ladder(100, growth=2.0) == (16, 32, 64, 112)  # powers of two, the top cut to cover 100
    assert ladder(1) == (16,)
    with pytest.raises(ValueError):
        ladder(10, growth=1.0)
    lengths = [10, 20, 30, 40, 100]
    assert padded_shapes(lengths, 2, (16, 48, 112)) == [(2, 112), (2, 48), (2, 16)]
    cost = shape_cost(lengths, 2, (16, 48, 112))
    assert (cost.shapes, cost.tokens, cost.padded_tokens) == (3, 200, 352) and cost.padding == pytest.approx(1.76)


def test_choose_buckets_trades_padding_for_compiles():
    lengths = list(np.random.default_rng(0).integers(10, 400, 2000))
    fine, coarse = ladder(400), ladder(400, growth=2.0)
    assert choose_buckets(lengths, 16, costs=(4.0, 1e-3)) == fine  # a padded token costs more than a compile
    assert choose_buckets(lengths, 16, costs=(4.0, 1e-6)) == coarse  # a compile costs more than the padding
    assert choose_buckets(lengths, 16, backend="gpu") == coarse
    assert shape_cost(lengths, 16, fine).shapes > shape_cost(lengths, 16, coarse).shapes
    assert shape_cost(lengths, 16, fine).padding < shape_cost(lengths, 16, coarse).padding


def test_batch_rows_split_over_the_mesh():
    mesh = make_mesh("data=2,fsdp=4")
    assert batch_rows(3, mesh) == 8 and batch_rows(16, mesh) == 16 and batch_rows(None, mesh) == 8
    assert batch_rows(3, None) == 3 and batch_rows(None, None) == 1
    with pytest.raises(ValueError):
        batch_rows(0, None)


def test_padding_is_masked_and_results_keep_input_order():
    seqs = sequences()
    got, stats, seen, batches, _ = run_sums(Scale(), seqs)
    np.testing.assert_allclose(got, [2.0 * s.sum() for s in seqs])
    assert stats.shapes == ((4, 32), (4, 16), (4, 8))  # longest first, one shape per bucket used
    assert stats.tokens == sum(b.tokens.size for b in batches)
    # a different ladder (more padding) gives the same sums
    np.testing.assert_allclose(run_sums(Scale(), seqs, buckets=(32,))[0], got)


def test_prefetch_keeps_batch_order_and_collects_every_batch_once():
    seqs = sequences(1, lengths=tuple(range(1, 33)))
    _, _, seen, batches, _ = run_sums(Scale(), seqs, batch_size=2)
    assert seen == [tuple(b.index) for b in batches]


def test_model_kwargs_reach_every_batch():
    seqs = sequences()
    got, *_ = run_sums(Scale(), seqs, model_kwargs={"offset": jnp.asarray(1.5)})
    np.testing.assert_allclose(got, [2.0 * s.sum() + 1.5 for s in seqs])


def test_one_compile_per_shape_across_runs_and_runners():
    seqs = sequences(2)
    TRACES.clear()
    model = Scale()
    _, first, *_ = run_sums(model, seqs, batch_size=5, buckets=(8, 16, 32))  # 5 rows: shapes no other test uses
    assert first.compiled == 2 and sorted(TRACES) == [(5, 16), (5, 32)]  # two batches, two buckets
    _, again, *_ = run_sums(Scale(), seqs, batch_size=5, buckets=(8, 16, 32))  # another model, same layout
    assert again.compiled == 0 and len(TRACES) == 2
    _, wider, *_ = run_sums(model, seqs, batch_size=5, buckets=(8, 16, 64))  # one new shape only
    assert wider.compiled == 1 and TRACES[-1] == (5, 64)


def test_rows_split_over_eight_devices():
    assert jax.device_count() == 8  # conftest: --xla_force_host_platform_device_count=8
    mesh = make_mesh("data=8")
    model = Scale()
    nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, PartitionSpec())))
    seqs = sequences(3)
    got, stats, _, batches, runner = run_sums(model, seqs, batch_size=3, mesh=mesh)
    np.testing.assert_allclose(got, [2.0 * s.sum() for s in seqs])
    assert {shape[0] for shape in stats.shapes} == {8}  # 3 rows rounded up to one per device
    executable = next(iter(runner._executables.values()))
    tokens_sharding = executable.input_shardings[0][1]["tokens"]
    assert tokens_sharding.spec[0] == ("data", "fsdp") and len(tokens_sharding.device_set) == 8


def test_executables_are_kept_per_key_and_signature_the_oldest_going_first():
    double = jax.jit(lambda x: 2 * x)
    table = Executables(limit=2)
    args = lambda n: (jax.ShapeDtypeStruct((n,), jnp.float32),)  # noqa: E731
    first, new, _ = table.compile(double, [3, 4, 3], args, key="double", mesh=None)
    assert new == [3, 4] and sorted(first) == [3, 4]
    np.testing.assert_allclose(first[3](jnp.ones(3, jnp.float32)), 2.0)
    again, new, _ = table.compile(double, [4], args, key="double", mesh=None)
    assert new == [] and again[4] is first[4]
    assert table.compile(double, [4], args, key="other layout", mesh=None)[1] == [4]  # evicts 3
    assert table.compile(double, [3, 4], args, key="double", mesh=None)[1] == [3]


def test_xla_fallback_retries_with_xla_attention_on_accelerators_only(monkeypatch):
    tried = []

    def compile_with(attention):
        tried.append(attention)
        if attention != "xla":
            raise RuntimeError("cuDNN refused the attention")
        return attention

    with pytest.raises(RuntimeError, match="cuDNN"):
        xla_fallback(compile_with, "a step")  # on a CPU a compile error is a real one
    assert tried == [None]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    tried.clear()
    assert xla_fallback(compile_with, "a step") == "xla" and tried == [None, "xla"]
    tried.clear()

    def exiting(attention):  # an interrupted process: the thread pool refuses work; no retry, no kernel warning
        tried.append(attention)
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    with pytest.raises(RuntimeError, match="interpreter shutdown"):
        xla_fallback(exiting, "a step")
    assert tried == [None]


def test_rows_and_prefetch_shared_with_the_trainer():
    mesh = make_mesh("data=8")
    assert row_sharding(None) is None and row_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
    assert row_sharding(mesh, ndim=2, leading=1).spec == PartitionSpec(None, ("data", "fsdp"), None)
    check_rows(3, None)
    with pytest.raises(ValueError, match="do not split over the mesh's 8 batch shards"):
        check_rows(12, mesh)
    pairs = [(i, {"x": np.full(8, i, np.int32)}) for i in range(5)]
    out = list(prefetch_with(iter(pairs), row_sharding(mesh), size=1))
    assert [meta for meta, _ in out] == list(range(5))
    assert all(a["x"].sharding.spec == PartitionSpec(("data", "fsdp")) and int(a["x"][0]) == m for m, a in out)
