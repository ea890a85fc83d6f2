"""Multi-host: two JAX processes of 4 CPU devices each run the whole job and match one process of 8 devices.

The two processes join through `jax.distributed` on localhost (Gloo collectives on the CPU), build a
mesh over all 8 global devices, and run every stage (load, probing pairs, evaluation, capture, prune,
components, probes, training, fold, Orbax and Hugging Face export) into one shared output folder. The
reference runs the same job in this process, on its 8 devices. Results must agree to float tolerance,
the folder must hold exactly what a single process writes, and the checkpoints the two processes wrote
(each its own shards) must restore in this single process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("restore_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_processes(model_dir: Path, out: Path, logs: Path) -> list[subprocess.Popen]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LCC_PROGRESS": "0"}
    procs = []
    for pid in range(2):
        log = open(logs / f"process{pid}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), str(model_dir), str(out), "--devices", "4", "--processes", "2",
             "--process-id", str(pid), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        ))
    return procs


def _wait(procs: list[subprocess.Popen], logs: Path, timeout: float = 900) -> None:
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if codes != [0, 0]:
        tails = "\n".join(f"--- process {i}:\n" + (logs / f"process{i}.log").read_text()[-3000:] for i in range(2))
        pytest.fail(f"worker exit codes {codes}\n{tails}")


def _ppl(out: Path, name: str) -> float:
    return json.loads((out / name).read_text())["wikitext2_ppl"]


@pytest.mark.slow
def test_two_processes_of_four_devices_equal_one_process_of_eight(tiny_model_dir, tmp_path):
    import jax

    import lcc_jax
    from lcc_jax.checkpoint import load_pruned
    from lcc_jax.restore.pipeline import run
    from lcc_jax.restore.probe import ProbeResult
    from restore_worker import tiny_job

    multi, single, logs = tmp_path / "two_processes", tmp_path / "one_process", tmp_path / "logs"
    logs.mkdir()
    procs = _start_processes(tiny_model_dir, multi, logs)
    try:
        job = tiny_job(tiny_model_dir, single)
        job.mesh = lcc_jax.make_mesh("fsdp=8")
        run(job)
    finally:
        _wait(procs, logs)
    for pid in range(2):
        assert f"process {pid} of 2, 4 local / 8 global devices" in (logs / f"process{pid}.log").read_text()

    # one writer: the same files as a single process, no second copy, no temporaries
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())
    assert (multi / "pairs.jsonl").read_text() == (single / "pairs.jsonl").read_text()

    for name in ("eval_dense.json", "eval_pruned.json", "eval_restored.json"):
        assert _ppl(multi, name) == pytest.approx(_ppl(single, name), rel=1e-5), name
    np.testing.assert_allclose(np.load(multi / "pruned_capture.npy"), np.load(single / "pruned_capture.npy"), atol=1e-5)
    probes_multi, probes_single = ProbeResult.load(multi / "probes.npz"), ProbeResult.load(single / "probes.npz")
    np.testing.assert_array_equal(probes_multi.ranking, probes_single.ranking)
    trained_multi, trained_single = np.load(multi / "compensation.npz"), np.load(single / "compensation.npz")
    for key in trained_single.files:
        np.testing.assert_allclose(trained_multi[key], trained_single[key], atol=1e-6, err_msg=key)  # fp32: ~1e-8

    # checkpoints saved as shards by two processes restore in one process (one device), equal to the reference
    pruned_multi, pruned_single = load_pruned(multi / "pruned"), load_pruned(single / "pruned")
    for path, keep in pruned_single.masks.items():
        np.testing.assert_array_equal(np.asarray(pruned_multi.masks[path]), np.asarray(keep), err_msg=path)
    restored_multi, _, _ = lcc_jax.load(multi / "restored", tokenizer=False)
    restored_single, _, _ = lcc_jax.load(single / "restored", tokenizer=False)
    exported, _, _ = lcc_jax.load(multi / "restored_hf", tokenizer=False)
    tokens = jax.numpy.asarray(np.random.RandomState(0).randint(0, 384, (2, 16)))
    reference = np.asarray(restored_single(tokens).logits)
    np.testing.assert_allclose(np.asarray(restored_multi(tokens).logits), reference, atol=1e-4)
    np.testing.assert_allclose(np.asarray(exported(tokens).logits), reference, atol=1e-4)


def test_multi_process_helpers_are_plain_on_one_process():
    import jax

    import lcc_jax
    from lcc_jax import distributed
    from lcc_jax.sharding import batch_sharding

    mesh = lcc_jax.make_mesh("data=2,fsdp=4")
    rows = np.arange(32, dtype=np.int32).reshape(8, 4)
    placed = distributed.to_global({"tokens": rows}, batch_sharding(mesh))["tokens"]
    assert placed.sharding == batch_sharding(mesh) and len(placed.addressable_shards) == 8
    doubled = jax.jit(lambda x: x * 2)(placed)
    np.testing.assert_array_equal(distributed.gather_to_host({"x": doubled})["x"], rows * 2)
    assert isinstance(distributed.gather_to_host(doubled), np.ndarray)
    distributed.barrier("nothing to wait for")
    assert distributed.broadcast(np.int32(7)) == 7 and distributed.all_true(True) and not distributed.all_true(False)
    assert not distributed.multi_process()
