"""The multi-device benchmark scripts on 8 fake CPU devices and the tiny shape: the scaling sweep, the sharded
large-model restore, and its dry run (abstract model, no weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import restore_large, scaling
from benchmarks.schema import read_report
from lcc_jax.pruning.masks import nm_mask

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

TINY = scaling.get_any_shape("tiny")


def test_large_shapes_are_llama2_configs():
    big = scaling.get_any_shape("llama2-70b")
    assert (big.hidden_size, big.num_layers, big.num_heads, big.num_kv_heads, big.intermediate_size,
            big.vocab_size) == (8192, 80, 64, 8, 28672, 32000)
    assert 68e9 < big.total_params() < 70e9
    assert scaling.get_any_shape("llama2-7b").hidden_size == 4096  # the shared table still answers


def test_mesh_plan_lists_each_distinct_mesh_once_small_weights_first():
    kinds = scaling.MESH_KINDS
    assert scaling.plan_meshes(kinds, 1) == [("single", (1, 1, 1))]
    assert [k for k, _ in scaling.plan_meshes(kinds, 2)] == ["fsdp", "tensor", "data"]  # no hybrid at 2
    assert scaling.plan_meshes(kinds, 8) == [("fsdp", (1, 8, 1)), ("tensor", (1, 4, 2)), ("hybrid", (2, 4, 1)),
                                             ("data", (8, 1, 1))]


def test_sharding_plan_shrinks_weights_with_fsdp_and_not_with_data():
    state = nnx.state(scaling.abstract_model(scaling.get_any_shape("llama2-70b")))
    per = {n: scaling.weight_bytes_per_device(state, scaling.abstract_mesh((1, n, 1))) for n in (1, 2, 4, 8)}
    for n in (2, 4, 8):
        assert per[1] / per[n] == pytest.approx(n, rel=1e-3)
    assert scaling.weight_bytes_per_device(state, scaling.abstract_mesh((8, 1, 1))) == per[1]


def test_random_sharded_model_draws_every_weight_on_its_mesh():
    mesh = scaling.device_mesh((1, 8, 1))
    model = scaling.random_sharded_model(TINY, mesh)
    kernel = model.layers.mlp.up_proj.kernel[...]  # (layers, embed, mlp): embed over fsdp
    assert kernel.dtype == jnp.bfloat16 and kernel.sharding.mesh == mesh
    assert kernel.sharding.shard_shape(kernel.shape) == (TINY.num_layers, TINY.hidden_size // 8,
                                                         TINY.intermediate_size)
    assert float(jnp.std(kernel.astype(jnp.float32))) == pytest.approx(0.02, rel=0.2)
    moved = scaling.reshard(model, scaling.device_mesh((2, 1, 1)))
    np.testing.assert_array_equal(np.asarray(moved.layers.mlp.up_proj.kernel[...]), np.asarray(kernel))


def test_efficiency_is_speedup_over_devices_per_stage_and_mode():
    def rec(stage, n, tps, mode="weak"):
        return {"shape": "s", "stage": stage, "scaling": mode, "devices": n, "tokens_per_s": tps}

    out = scaling.add_efficiency([rec("a", 1, 100.0), rec("a", 8, 640.0), rec("b", 1, 10.0), rec("b", 4, 40.0),
                                  rec("a", 8, 400.0, "strong")])
    assert [r["efficiency"] for r in out] == [1.0, 0.8, 1.0, 1.0, None]  # strong has no 1-device record here
    assert out[1]["speedup"] == pytest.approx(6.4)
    later = scaling.add_efficiency([rec("a", 4, 360.0)], baselines=out)  # a run of 4 devices alone, same file
    assert later[0]["efficiency"] == pytest.approx(0.9)


@pytest.mark.slow
def test_scaling_capture_over_1_2_4_8_devices(tmp_path):
    out = tmp_path / "scaling.json"
    records = scaling.main(["--shape", "tiny", "--in-process", "--devices", "1,2,4,8", "--meshes", "tensor",
                            "--stages", "capture", "--peak-tflops", "1", "--out", str(out)])
    assert [(r["devices"], r["mesh"]) for r in records] == [
        (1, "data=1,fsdp=1,tensor=1"), (2, "data=1,fsdp=1,tensor=2"), (4, "data=1,fsdp=2,tensor=2"),
        (8, "data=1,fsdp=4,tensor=2")]
    saved = read_report(out)["records"]
    assert len(saved) == len(records) == 4
    for r in saved:
        assert r["stage"] == "scaling_capture" and r["scaling"] == "weak" and r["tokens_per_s"] > 0
        assert r["efficiency"] == pytest.approx(r["tokens_per_s"] / (r["devices"] * saved[0]["tokens_per_s"]))
        assert len(r["peak_mem_gib_per_device"]) == r["devices"]  # None each on CPU
        assert r["activations_shape"] == [8 * r["devices"], TINY.total_heads, TINY.head_dim]  # weak: 8 per device


@pytest.mark.slow
def test_scaling_train_step_data_parallel_on_1_and_8_devices(tmp_path):
    records = scaling.main(["--shape", "tiny", "--in-process", "--devices", "1,8", "--meshes", "data",
                            "--stages", "train_step", "--peak-tflops", "1", "--out", str(tmp_path / "s.json")])
    assert [(r["devices"], r["mesh"], r["batch_size"]) for r in records] == [(1, "data=1,fsdp=1,tensor=1", 2),
                                                                             (8, "data=8,fsdp=1,tensor=1", 16)]
    assert all(r["stage"] == "scaling_train_step" for r in records)
    assert records[0]["efficiency"] == 1.0 and records[1]["efficiency"] > 0
    assert all(np.isfinite(r["loss_last"]) for r in records)


def test_prune_2_4_keeps_what_nm_mask_keeps():
    w = jax.random.normal(jax.random.key(0), (2, 16, 8), jnp.bfloat16)
    w = w.at[0, :4, 0].set(0.5)  # ties: a stable order decides
    expected = np.where(np.asarray(nm_mask(jnp.abs(w.astype(jnp.float32)), 2, 4)), np.asarray(w), 0)
    np.testing.assert_array_equal(np.asarray(restore_large._prune_2_4(jnp.array(w))), expected)


@pytest.mark.slow
def test_restore_large_runs_end_to_end_on_8_devices(tmp_path):
    out = tmp_path / "restore.json"
    [rec] = restore_large.main(["--shape", "tiny", "--peak-tflops", "1", "--out", str(out)])
    assert rec["stage"] == "restore_large" and rec["devices"] == 8 and rec["mesh"] == "data=1,fsdp=8,tensor=1"
    assert tuple(rec["phases"]) == restore_large.PHASES
    assert rec["train_steps"] == restore_large.TINY_WORK.train_steps and np.isfinite(rec["loss_last"])
    assert rec["compensated_heads"] == round(0.25 * TINY.total_heads)
    assert read_report(out)["records"][0]["phases"] == rec["phases"]


def test_dry_run_weights_shrink_with_fsdp_and_steps_lower(capsys):
    results = restore_large.main(["--dry-run", "--lower-only", "--shape", "llama2-70b", "--devices", "1,2,4,8"])
    per = [r["weights_bytes_per_device"] for r in results]
    assert [per[0] / p for p in per] == pytest.approx([1, 2, 4, 8], rel=1e-3)
    assert per[0] == results[0]["weights_bytes_total"]
    est = [r["estimate_bytes"]["train"] for r in results]
    assert est == sorted(est, reverse=True) and results[-1]["fits_estimate"]["80 GB"]
    assert not results[0]["fits_estimate"]["141 GB"]  # 70B bf16 is 138 GB before activations
    assert "| `data=1,fsdp=8,tensor=1` | 16.06 |" in capsys.readouterr().out


def test_dry_run_compiled_capture_reports_device_bytes():
    mesh = scaling.device_mesh((1, 8, 1))
    program, batch = restore_large.capture_program(TINY, mesh, restore_large.TINY_WORK)
    stats = restore_large._stats(program)
    _, state = scaling.abstract_state(TINY, mesh)
    assert batch == (8, 32) and stats["total"] >= stats["argument"] >= scaling.weight_bytes_per_device(state, mesh)


def test_restore_large_records_where_it_stopped(monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise MemoryError("RESOURCE_EXHAUSTED: out of memory while trying to allocate")

    monkeypatch.setattr(restore_large, "random_sharded_model", out_of_memory)
    rec = restore_large.run(TINY, scaling.device_mesh((1, 8, 1)), restore_large.TINY_WORK)
    assert rec["failed_phase"] == "init" and rec["error"].startswith("MemoryError: RESOURCE_EXHAUSTED")
    assert rec["phases"] == {} and "| init | **failed**" in restore_large.phase_table(rec)
