"""The benchmark scripts run on the tiny shape on CPU and write records in the shared schema; the report pairs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report as report_mod
from benchmarks.schema import STAGES, merge_reports

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"stage": str, "impl": str, "shape": str, "seconds": float, "extrapolated": bool, "notes": str}
OPTIONAL_NUMBERS = ("tokens_per_s", "samples_per_s", "steps_per_s", "mfu", "model_flops", "peak_mem_gib")


def check_record(r: dict) -> None:
    for key, kind in KEYS.items():
        assert isinstance(r[key], kind), (key, r.get(key))
    assert r["stage"] in STAGES and r["seconds"] > 0
    for key in OPTIONAL_NUMBERS:
        assert key in r and (r[key] is None or isinstance(r[key], (int, float))), key
    if r["mfu"] is not None:
        assert 0 < r["mfu"] < 1.5


@pytest.fixture(scope="module")
def ctx():
    from benchmarks.workload import Context

    return Context.create("tiny", peak_tflops=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["capture", "train_step", "wanda", "sparsegpt_layer", "sparsegpt_model", "job"])
def test_each_stage_writes_valid_records_on_the_tiny_shape(ctx, stage, tmp_path):
    from benchmarks.common import append_records, read_report
    from benchmarks.worker import RUNNERS

    records = RUNNERS[stage](ctx)
    assert records and all(r["stage"] == stage and r["impl"] == "lcc_jax" and r["shape"] == "tiny" for r in records)
    for r in records:
        check_record(r)
    path = tmp_path / "report.json"
    append_records(path, records, ctx.peak_tflops)
    saved = read_report(path)
    assert saved["peak_bf16_tflops"] == 0.05 and saved["versions"]["jax"] and len(saved["records"]) == len(records)
    if stage in ("capture", "train_step", "job"):
        assert all(r["mfu"] is not None for r in records)
    if stage == "job":  # each phase says how much of it was compiling, and what the compile cache served
        compiling = records[0]["phases_compiling"]
        assert set(compiling) == set(records[0]["phases"])
        assert all(set(c) == {"hits", "misses", "compile_seconds"} and c["compile_seconds"] >= 0
                   for c in compiling.values())
        # the train step compiled on a thread while capture and pruning ran: every shape it needs was ready
        assert records[0]["train_compiled_ahead"] >= 1
        assert sum(c["compile_seconds"] for c in compiling.values()) > 0


@pytest.mark.slow
def test_driver_runs_a_stage_in_a_worker_and_writes_the_results_page(tmp_path):
    out, page = tmp_path / "lcc.json", tmp_path / "RESULTS.md"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "benchmarks.run", "--shapes", "tiny", "--stages", "train", "--out", str(out),
           "--report", str(page), "--set", "train_steps=2"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["stage"] for r in data["records"]] == ["train_step"]
    check_record(data["records"][0])
    assert data["records"][0]["steps_per_s"] > 0 and "| train_step | tiny |" in page.read_text()


@pytest.mark.parametrize("outputs, expected, lost", [
    # a cuDNN read-back failure: once more as it was (the warm cache kept), and it passes
    ([(1, ["... capturing stream has unjoined work", "FAILED: job"]), (0, ["done"])], [None, "cudnn read-back"], []),
    # it fails again: then XLA attention, as for any failure
    ([(1, ["cuda_graph_end_capture failed", "FAILED: job"]), (1, ["FAILED: job"]), (0, [])],
     [None, "cudnn read-back", "xla"], []),
    # any other failure goes straight to XLA attention
    ([(1, ["RESOURCE_EXHAUSTED", "FAILED: job"]), (0, [])], [None, "xla"], []),
    # XLA attention fails too (out of memory on an H100, 2026-12-08): the stage is lost, and the driver says so
    ([(1, ["cuda_graph_end_capture failed", "FAILED: job"]), (1, ["FAILED: job"]), (1, ["OOM", "FAILED: job"])],
     [None, "cudnn read-back", "xla"], ["job"]),
])
def test_the_driver_retries_a_cudnn_read_back_failure_as_it_was_before_xla_attention(monkeypatch, outputs, expected,
                                                                                     lost):
    import argparse

    from benchmarks import run

    calls = []

    def fake_run(cmd, env, timeout):
        calls.append(env.get(run.RETRY_ENV) or ("xla" if env.get("LCC_ATTENTION") == "xla" else None))
        assert cmd[cmd.index("--stages") + 1] == "job"
        return outputs[len(calls) - 1]

    monkeypatch.setattr(run, "_run", fake_run)
    monkeypatch.delenv("LCC_ATTENTION", raising=False)
    got = run.run_lcc("tiny", ["job"], "out.json", argparse.Namespace(isolate=False, set=[], profile=None, timeout=60))
    assert calls == expected and got == lost


def test_the_driver_exits_nonzero_when_a_stage_failed_for_good(monkeypatch, tmp_path, caplog):
    """A phase runner (benchmarks/gpu/phases.sh) marks a phase done on exit 0: a lost stage must not read as done."""
    from benchmarks import run

    monkeypatch.setattr(run, "run_lcc", lambda shape, stages, out, args: ["job"] if shape == "llama2-7b" else [])
    with pytest.raises(SystemExit) as stopped:
        run.main(["--shapes", "tiny,llama2-7b", "--stages", "job", "--out", str(tmp_path / "out.json")])
    assert stopped.value.code == 1 and "failed after every retry: job on llama2-7b" in caplog.text
    run.main(["--shapes", "tiny", "--stages", "job", "--out", str(tmp_path / "out.json")])  # nothing lost: returns


def test_a_retried_workers_records_say_why(monkeypatch):
    from benchmarks.common import record

    monkeypatch.setenv("LCC_BENCH_RETRY", "cudnn read-back")
    assert record("job", "tiny", 1.0)["retried"] == "cudnn read-back"
    monkeypatch.delenv("LCC_BENCH_RETRY")
    assert "retried" not in record("job", "tiny", 1.0)


def _rec(stage, impl, shape="llama2-7b", seconds=10.0, **extra):
    base = {"stage": stage, "impl": impl, "shape": shape, "seconds": seconds, "tokens_per_s": None,
            "samples_per_s": None, "steps_per_s": None, "mfu": None, "model_flops": None, "peak_mem_gib": None,
            "extrapolated": False, "notes": ""}
    return {**base, **extra}


def test_report_pairs_records_by_stage_shape_and_variant(tmp_path):
    lcc = {"device": "NVIDIA H200", "versions": {"jax": "0.11.2"}, "peak_bf16_tflops": 800.0, "records": [
        _rec("capture", "lcc_jax", seconds=2.0, tokens_per_s=30000.0, mfu=0.55, variant="batch64"),
        _rec("train_step", "lcc_jax", seconds=3.0, tokens_per_s=12000.0, mfu=0.40, variant="batch8"),
        _rec("sparsegpt_layer", "lcc_jax", seconds=1.0, variant="2:4"),
        _rec("sparsegpt_layer", "lcc_jax", seconds=2.0, variant="unstructured"),
        _rec("job", "lcc_jax", seconds=200.0, peak_mem_gib=40.0, variant="reference"),
        _rec("capture", "lcc_jax", shape="smollm2-135m", seconds=1.0, tokens_per_s=1e5),
    ]}
    torch = {"device": "NVIDIA H200", "versions": {"torch": "2.11"}, "peak_bf16_tflops": 790.0, "records": [
        _rec("capture", "torch_reference", tokens_per_s=1663.0, variant="one_at_a_time"),
        _rec("capture", "torch_batched", tokens_per_s=7000.0, variant="batch32"),
        _rec("train_step", "torch_reference", tokens_per_s=4330.0, variant="batch8"),
        _rec("sparsegpt_layer", "torch_reference", seconds=3.0, variant="unstructured"),
        _rec("sparsegpt_layer", "torch_reference", seconds=4.0, variant="2:4"),
        _rec("job", "torch_reference", seconds=30.0, extrapolated=False, variant="reference"),
        _rec("job", "torch_reference", seconds=660.0, extrapolated=True, variant="reference"),
    ]}
    merged = merge_reports(lcc, torch)
    assert merged["peak_bf16_tflops"] == 800.0 and merged["peak_bf16_tflops_torch"] == 790.0
    assert merged["versions"] == {"jax": "0.11.2", "torch": "2.11"}
    rows = {(r["ours"]["stage"], r["ours"]["shape"], r["ours"].get("variant")): r for r in report_mod.rows(merged["records"])}
    capture = rows[("capture", "llama2-7b", "batch64")]
    assert capture["x_reference"] == pytest.approx(30000 / 1663) and capture["x_batched"] == pytest.approx(30000 / 7000)
    assert rows[("train_step", "llama2-7b", "batch8")]["x_reference"] == pytest.approx(12000 / 4330)
    assert rows[("sparsegpt_layer", "llama2-7b", "2:4")]["x_reference"] == pytest.approx(4.0)  # same variant: 4 s / 1 s
    assert rows[("sparsegpt_layer", "llama2-7b", "unstructured")]["x_reference"] == pytest.approx(1.5)
    assert rows[("job", "llama2-7b", "reference")]["x_reference"] == pytest.approx(660 / 200)  # the full-size one
    assert rows[("capture", "smollm2-135m", None)]["reference"] is None
    lines = report_mod.targets(report_mod.rows(merged["records"]))
    assert "- MISSED: train_step batch8: MFU 40.0% (target ≥ 45%) — 1.12× short" in lines
    assert any(line.startswith("- met: capture batch64: MFU 55.0%") for line in lines)
    assert any(line.startswith("- MISSED: job: 200 s (target ≤ 180 s) — 20 s over") for line in lines)
    lcc_path, torch_path, page = tmp_path / "lcc.json", tmp_path / "torch.json", tmp_path / "RESULTS.md"
    lcc_path.write_text(json.dumps(lcc))
    torch_path.write_text(json.dumps(torch))
    report_mod.write_results([str(lcc_path), str(torch_path)], str(page), "python -m benchmarks.run --torch")
    text = page.read_text()
    assert "NVIDIA H200" in text and "`python -m benchmarks.run --torch`" in text and "## Targets (7B shape)" in text
    assert text.count("| capture |") == 2 and "18.04" in text


def test_report_recomputes_mfu_against_a_given_peak():
    records = [_rec("capture", "lcc_jax", seconds=2.0, mfu=1.4, model_flops=800e12),
               _rec("wanda", "lcc_jax", seconds=1.0)]  # no FLOPs: left alone
    fixed = report_mod.with_peak({"peak_bf16_tflops": 355.0, "records": records}, 800.0)
    assert fixed["peak_bf16_tflops"] == 800.0
    assert fixed["records"][0]["mfu"] == pytest.approx(0.5)  # 800 TFLOP in 2 s at an 800 TFLOP/s peak
    assert fixed["records"][1] == records[1] and records[0]["mfu"] == 1.4  # the input is not modified


def test_zeroshot_prep_times_each_part_of_a_fresh_process_on_the_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    from benchmarks import zeroshot_prep

    monkeypatch.setenv("LCC_CACHE_DIR", str(tmp_path / "cache"))
    run = zeroshot_prep.one_process(str(tiny_model_dir), "rte,arc_easy", batch=8)
    assert run["requests"] > run["rows"] > 0 and run["batches"] >= 1  # ARC's choices share their context
    parts = ("load_s", "documents_and_pairs_s", "score_rows_s", "batches_and_arrays_s")
    assert all(run[p] >= 0 for p in parts) and run["total_s"] >= sum(run[p] for p in parts) - 0.01


def test_attention_memory_compiles_both_ways_and_recomputing_keeps_less(tmp_path):
    from benchmarks import attention_memory

    out = tmp_path / "memory.json"
    attention_memory.main(["--shape", "tiny", "--seq", "64", "--out", str(out)])
    kept, recomputed = json.loads(out.read_text())["records"]
    assert not kept["recompute_scores"] and recomputed["recompute_scores"]
    assert recomputed["memory"]["temp"] < kept["memory"]["temp"]
    assert recomputed["batch_shape"] == kept["batch_shape"] == [1, 1, 256]  # rows are multiples of 256 tokens
