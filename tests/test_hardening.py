"""Hardening: clean stops on SIGINT / SIGTERM, atomic writes, the claimed output folder, out-of-memory advice,
and clear errors for bad input.

Bad input tested elsewhere (not repeated here):
  * unsupported architecture: test_config.py::test_unknown_model_type_is_refused_by_name,
    test_load_errors.py::test_unknown_architecture_names_it_and_the_supported_ones,
    test_load_errors.py::test_gguf_of_an_unsupported_architecture
  * malformed config: test_config.py::test_from_file_names_malformed_json, ::test_missing_required_field_is_named,
    ::test_from_file_refuses_json_that_is_not_an_object; test_load_errors.py::test_folder_without_config_json
  * jsonl missing fields, bad JSON, empty file: test_instructions.py::test_missing_field_names_line_and_field,
    ::test_bad_json_empty_file_and_unknown_source, ::test_task_record_missing_field_is_reported
  * a mesh that does not divide a weight:
    test_sharding.py::test_a_mesh_that_does_not_divide_a_dimension_names_the_parameter
  * top-k beyond the heads (library call): test_compensation.py::test_init_selects_top_heads_with_small_normal_params
  * a changed configuration refused, end to end:
    test_restore_pipeline.py::test_restore_job_runs_every_stage_keeps_sparsity_and_resumes
Here: the pipeline's own checks, before anything slow (batches the mesh cannot split, --top-k beyond
the model, no usable training sample), the restart path, and the interruption machinery.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

import lcc_jax
from lcc_jax import signals
from lcc_jax.restore import job_folder, pipeline
from lcc_jax.restore.hints import OutOfMemory
from lcc_jax.restore.pipeline import RestoreError, run
from test_restore_pipeline import _job


def _xla_oom() -> Exception:
    return jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes. BufferAssignment OOM Debugging."
    )


# ----------------------------------------------------------------------------- signals


def test_sigterm_inside_graceful_raises_interrupted_with_the_shell_exit_code():
    with pytest.raises(signals.Interrupted) as caught:
        with signals.graceful():
            signal.raise_signal(signal.SIGTERM)
    assert caught.value.signum == signal.SIGTERM and caught.value.exit_code == 143
    assert isinstance(caught.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_a_signal_inside_a_critical_section_arrives_when_it_ends():
    steps = []
    with pytest.raises(signals.Interrupted, match="SIGINT"):
        with signals.graceful():
            with signals.critical():
                signal.raise_signal(signal.SIGINT)
                steps.append("finished the section")
            steps.append("after the section")
    assert steps == ["finished the section"]


def test_an_interrupt_between_the_renames_of_a_promotion_waits_for_both(tmp_path, monkeypatch):
    from lcc_jax.convert.export import staging_folder

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    real_rename = Path.rename

    def rename_then_signal(self, target):
        result = real_rename(self, target)
        signal.raise_signal(signal.SIGTERM)  # right after moving the old result aside
        return result

    monkeypatch.setattr(Path, "rename", rename_then_signal)
    with pytest.raises(signals.Interrupted):
        with signals.graceful():
            with staging_folder(tmp_path / "out", overwrite=True) as tmp:
                (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]


# ----------------------------------------------------------------------------- atomic writes


def test_an_interrupted_save_keeps_the_previous_checkpoint_and_leaves_no_temporaries(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    from model_utils import SMALL_CONFIG, random_model

    model = random_model(SMALL_CONFIG)
    lcc_jax.save_orbax(model, None, tmp_path / "ckpt")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "ckpt").rglob("*"))

    def interrupted(*args, **kwargs):
        raise signals.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", interrupted)
    with pytest.raises(signals.Interrupted):
        lcc_jax.save_orbax(random_model(SMALL_CONFIG, seed=1), None, tmp_path / "ckpt", overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "ckpt").rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    restored, _, _ = lcc_jax.load(tmp_path / "ckpt", tokenizer=False)
    np.testing.assert_array_equal(np.asarray(restored.embed.embedding[...]), np.asarray(model.embed.embedding[...]))


def test_a_stage_file_appears_whole_or_not_at_all(tmp_path):
    def half_written(path):
        Path(path).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        job_folder.save_file(tmp_path / "probes.npz", half_written)
    with pytest.raises(KeyboardInterrupt):
        job_folder.save_folder(tmp_path / "dense_capture", lambda p: (Path(p).mkdir(), half_written(Path(p) / "a.npy")))
    assert not (tmp_path / "probes.npz").exists() and not (tmp_path / "dense_capture").exists()
    # the next run's claim clears what the interrupted writes left behind
    left = sorted(p.name for p in job_folder.remove_leftovers(tmp_path))
    assert left == [".dense_capture.partial", ".tmp.probes.npz"]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the output folder


def test_a_changed_configuration_is_refused_by_field_unless_restarting(tmp_path):
    out = tmp_path / "run"
    first = {"model": "m", "restore": {"top_k": 0.25, "capture_batch_size": 16, "remat": False}}
    job_folder.claim(out, first, restart=False)
    (out / "probes.npz").write_text("a finished stage")
    (out / ".pairs.jsonl.tmp").write_text("left by an interrupted run")

    # memory-only settings may change: the folder resumes
    job_folder.claim(out, {**first, "restore": {**first["restore"], "capture_batch_size": 4, "remat": True}}, False)
    assert (out / "probes.npz").exists() and not (out / ".pairs.jsonl.tmp").exists()

    changed = {**first, "restore": {**first["restore"], "top_k": 0.5}}
    with pytest.raises(RestoreError, match=r"different configuration \(restore\.top_k: 0\.25 -> 0\.5\).*--restart"):
        job_folder.claim(out, changed, restart=False)
    assert (out / "probes.npz").exists()

    job_folder.claim(out, changed, restart=True)
    assert [p.name for p in out.iterdir()] == ["run.json"]
    assert json.loads((out / "run.json").read_text())["restore"]["top_k"] == 0.5


# ----------------------------------------------------------------------------- out of memory


def test_out_of_memory_while_loading_names_dtype_and_mesh(tiny_model_dir, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise _xla_oom()

    monkeypatch.setattr(pipeline, "load", oom)
    with pytest.raises(OutOfMemory, match=r"stage 'load' ran out of device memory") as caught:
        run(_job(tiny_model_dir, tmp_path / "run"))
    assert "--dtype bf16" in str(caught.value) and "--mesh fsdp=-1" in str(caught.value)
    assert isinstance(caught.value.__cause__, jax.errors.JaxRuntimeError)


@pytest.mark.parametrize(
    "stage, knobs",
    [
        ("train", ["--remat", "--batch-size 4 --grad-accum 2 (the same 8 samples per step)", "--max-length 32"]),
        ("dense_capture", ["--capture-batch-size 4 (now 8)", "--capture-length 32 (now 64)"]),
        ("prune", ["--nsamples 2 or --seqlen 32"]),
        ("eval_pruned", ["--eval-seqlen 32 (now 64"]),
    ],
)
def test_out_of_memory_in_a_stage_names_its_knobs(tmp_path, stage, knobs):
    job = _job("m", tmp_path, batch_size=8)
    job.mesh = lcc_jax.make_mesh("fsdp=8")
    with pytest.raises(OutOfMemory) as caught:
        with job_folder.stage(job, stage):
            raise _xla_oom()
    message = str(caught.value)
    for knob in knobs + ["--dtype bf16", f"now {dict(job.mesh.shape)}"]:
        assert knob in message, (knob, message)


def test_host_memory_error_is_explained_too(tmp_path):
    with pytest.raises(OutOfMemory, match="ran out of host memory"):
        with job_folder.stage(_job("m", tmp_path), "components"):
            raise MemoryError()


def test_other_errors_pass_through_a_stage_unchanged(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with job_folder.stage(_job("m", tmp_path), "probes"):
            raise ZeroDivisionError("division by zero")


# ----------------------------------------------------------------------------- bad input, refused early


def test_a_batch_the_mesh_cannot_split_is_refused_before_loading(tmp_path):
    job = _job("no-such-model", tmp_path / "run")  # training batch 4, calibration batch 4
    job.mesh = lcc_jax.make_mesh("fsdp=8")
    with pytest.raises(RestoreError, match=r"--batch-size 4 does not split over the mesh's 8 batch shards"):
        run(job)
    job = _job("no-such-model", tmp_path / "run", batch_size=8)
    job.mesh = lcc_jax.make_mesh("fsdp=8")
    with pytest.raises(RestoreError, match=r"pruning calibrates in batches of 4 sequences.*multiples of 8"):
        run(job)
    assert not (tmp_path / "run").exists()


def test_top_k_beyond_the_models_heads_is_refused_right_after_loading(tiny_model_dir, tmp_path):
    with pytest.raises(RestoreError, match=r"--top-k 9 asks for more heads than .* 2 layers x 4 heads = 8"):
        run(_job(tiny_model_dir, tmp_path / "run", top_k=9))
    assert not (tmp_path / "run" / "pairs.jsonl").exists()


def test_training_data_without_a_response_in_reach_is_refused_before_probing(tiny_model_dir, tmp_path):
    rows = [{"prompt": "word " * 80, "response": " yes"} for _ in range(4)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = _job(tiny_model_dir, tmp_path / "run", train_data=str(data), num_train=4, num_probe=4, valid_data="none")
    with pytest.raises(RestoreError, match=r"no training sample .* within --max-length 64.*Raise --max-length"):
        run(job)
    assert not (tmp_path / "run" / "pairs.jsonl").exists()


# ----------------------------------------------------------------------------- real signals, real stages

WORKER = Path(__file__).with_name("restore_worker.py")


def _run_worker(model_dir: Path, out: Path, stop_at: str | None = None, signum: int = signal.SIGTERM):
    """(exit code, log) of tests/restore_worker.py on one device; `signum` is sent 0.5 s after the log says `stop_at`
    (well inside that stage: the tiny model's prune and train stages take seconds)."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "LCC_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, str(WORKER), str(model_dir), str(out), "--devices", "1", "--mesh", "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if stop_at is not None and stop_at in line:
                time.sleep(0.5)
                proc.send_signal(signum)
                break
        lines.append(proc.communicate(timeout=600)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(lines)


@pytest.mark.slow
def test_sigterm_then_sigint_mid_stage_resume_to_the_uninterrupted_result(tiny_model_dir, tmp_path):
    from lcc_jax.restore.probe import ProbeResult
    from restore_worker import tiny_job

    out = tmp_path / "run"
    code, log = _run_worker(tiny_model_dir, out, "stage prune ...", signal.SIGTERM)
    assert code == 143, log[-3000:]
    assert "stage prune interrupted" in log
    assert (out / "dense_capture").is_dir() and (out / "eval_dense.json").is_file() and not (out / "pruned").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # nothing half-written left

    code, log = _run_worker(tiny_model_dir, out, "stage train ...", signal.SIGINT)
    assert code == 130, log[-3000:]
    assert "stage dense_capture ..." not in log and "stage prune ..." in log  # resumed at the unfinished stage
    assert (out / "probes.npz").is_file() and not (out / "compensation.npz").exists()

    code, log = _run_worker(tiny_model_dir, out)
    assert code == 0, log[-3000:]
    assert "stage probes ..." not in log and "stage train ..." in log

    reference = tmp_path / "reference"
    run(tiny_job(tiny_model_dir, reference))
    for name in ("eval_dense.json", "eval_pruned.json", "eval_restored.json"):
        got, want = (json.loads((folder / name).read_text())["wikitext2_ppl"] for folder in (out, reference))
        assert got == pytest.approx(want, rel=1e-6), name
    np.testing.assert_array_equal(ProbeResult.load(out / "probes.npz").ranking,
                                  ProbeResult.load(reference / "probes.npz").ranking)
    for key, value in np.load(reference / "compensation.npz").items():
        np.testing.assert_allclose(np.load(out / "compensation.npz")[key], value, atol=1e-7, err_msg=key)
