"""One JAX process of a tiny RestoreLCC run (alone, or one of several), for the multi-host and interruption tests.

    python tests/restore_worker.py MODEL_DIR OUT [--devices 8] [--mesh fsdp=-1|none]
        [--processes 2 --process-id 0 --port 12345]

Sets up fake CPU devices before JAX starts, joins the other processes through lcc_jax.distributed,
and runs `lcc_jax.restore.pipeline.run` on `tiny_job` over a mesh of all global devices (every process
runs the same command, as on a TPU pod slice). Exits 0, or 128 + signal when SIGINT / SIGTERM stopped it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def tiny_job(model: str | Path, out: Path):
    """The tiny job of test_restore_pipeline with every batch a multiple of 8 (8 devices split it), on PIQA:
    its negatives are the other answer, so no sentence embedder runs (faster on a busy CPU)."""
    from test_restore_pipeline import _job

    job = _job(model, Path(out), batch_size=8, train_data="piqa", train_split="validation", valid_data="piqa",
               compute_dtype="float32")
    job.prune = dataclasses.replace(job.prune, batch_size=8)
    job.calibration = dataclasses.replace(job.calibration, nsamples=8)
    return job


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices of this process")
    parser.add_argument("--mesh", default="fsdp=-1", help="a mesh spec, or 'none' for one device")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)

    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("LCC_PROGRESS", "0")
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    import lcc_jax
    from lcc_jax.progress import setup_logging
    from lcc_jax.restore.pipeline import run
    from lcc_jax.signals import Interrupted

    setup_logging()
    if args.processes > 1:
        lcc_jax.distributed.initialize(f"localhost:{args.port}", args.processes, args.process_id)
    job = tiny_job(args.model, Path(args.out))
    job.mesh = None if args.mesh == "none" else lcc_jax.make_mesh(args.mesh)
    try:
        run(job)
    except Interrupted as e:
        # Leave without interpreter teardown: after an interrupt, tearing down XLA's runtime while its threads
        # wind down has segfaulted now and then (exit -11 instead of 130, also at older commits). The stop itself
        # is what the tests check; the exit code is what a scheduler sees.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.exit_code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
