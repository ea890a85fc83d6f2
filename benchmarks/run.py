"""Drive the benchmarks: lcc_jax stages per shape in worker processes, optionally the PyTorch reference, one JSON.

  PYTHONUNBUFFERED=1 python -m benchmarks.run --shapes smollm2-135m,llama2-7b --out results/h200.json \
      [--stages capture,train_step,wanda,sparsegpt,job] [--torch] [--report benchmarks/RESULTS.md]

Per shape: one worker process runs the stages other than the job (one model, built once; ordered by
growing memory so each record's process peak is mostly its own), then the job in a process of its
own (a clean peak); `--isolate` gives every stage its own process. A stage that fails is retried once
in a fresh process with LCC_ATTENTION=xla (XLA attention instead of cuDNN), and its records say so. A failure of
a cuDNN program read back from the compile cache (`compile_cache.read_back_failure`, a race) is first retried
once as it was, with the same warm cache; those records carry `retried`.
With `--torch`, `python -m benchmarks.reference_torch` runs the same stages on the same shapes and its
records join the same report. The report is rewritten after every process, so a killed run keeps
everything measured so far; `--report` also writes RESULTS.md from it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.schema import expand_stages, merge_reports, read_report, write_report  # jax-free: the GPU stays free

log = logging.getLogger("benchmarks.run")

DEFAULT_SHAPES = ("smollm2-135m", "llama2-7b")
DEFAULT_STAGES = ("capture", "wanda", "sparsegpt_layer", "sparsegpt_model", "train_step", "job")
TORCH_STAGE = {"capture": "capture", "train_step": "train", "wanda": "wanda", "sparsegpt_layer": "sparsegpt_layer",
               "sparsegpt_model": "sparsegpt_model", "job": "job"}


def _expand(stages: Sequence[str]) -> list[str]:
    ordered = expand_stages(stages)
    return [s for s in DEFAULT_STAGES if s in ordered]


def _groups(stages: list[str], isolate: bool) -> list[list[str]]:
    """Worker process groups: the job alone, the rest together (or every stage alone)."""
    if isolate:
        return [[s] for s in stages]
    rest = [s for s in stages if s != "job"]
    return [g for g in (rest, ["job"] if "job" in stages else []) if g]


_DEADLINE = [float("inf")]  # perf_counter time by which every process must have ended (--budget)


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, list[str]]:
    """Run `cmd`, echoing its output; (exit status, its non-empty output lines). A timeout kills it (status 124)."""
    timeout = min(timeout, _DEADLINE[0] - time.perf_counter())
    if timeout < 10:
        log.warning("no time left in the budget; skipping %s", " ".join(cmd[2:6]))
        return 124, []
    log.info("$ %s", " ".join(shlex.quote(c) for c in cmd))
    started = time.perf_counter()
    lines: list[str] = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:

        def pump():
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                if line.strip():
                    lines.append(line.strip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            log.warning("timed out after %.0f s: %s", timeout, " ".join(cmd[2:6]))
            status = 124
        reader.join(timeout=5)
    log.info("exit %d after %.1f s", status, time.perf_counter() - started)
    return status, lines


def run_lcc(shape: str, stages: list[str], out: str, args: argparse.Namespace) -> list[str]:
    """Every stage of `shape` in worker processes (retried as below); returns the stages that failed for good."""
    lost: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LCC_PROGRESS": os.environ.get("LCC_PROGRESS", "0")}
    for group in _groups(stages, args.isolate):
        cmd = [sys.executable, "-m", "benchmarks.worker", "--shape", shape, "--stages", ",".join(group), "--out", out]
        for item in args.set:
            cmd += ["--set", item]
        if args.profile and group != ["job"]:
            cmd += ["--profile", args.profile]
        status, lines = _run(cmd, env, args.timeout)
        failed = group
        if status not in (0, 124) and _read_back_failed(lines):
            failed = _failed_stages(lines, failed)
            log.warning("retrying %s on %s once as it was: a cuDNN program read back from the compile cache failed "
                        "its first run (a race)", failed, shape)
            status, lines = _run(_with_stages(cmd, group, failed), {**env, RETRY_ENV: "cudnn read-back"}, args.timeout)
        if status in (0, 124):  # done, or out of time (what it measured is in the report already)
            continue
        failed = _failed_stages(lines, failed)
        log.warning("retrying %s on %s with LCC_ATTENTION=xla", failed, shape)
        status, lines = _run(_with_stages(cmd, group, failed), {**env, "LCC_ATTENTION": "xla"}, args.timeout)
        if status not in (0, 124):
            lost += _failed_stages(lines, failed)
    return lost


def _failed_stages(lines: list[str], default: list[str]) -> list[str]:
    """The stages a worker's last line names as failed ("FAILED: a,b"), else `default`."""
    last = lines[-1] if lines else ""
    return last.removeprefix("FAILED: ").split(",") if last.startswith("FAILED: ") else default


def _with_stages(cmd: list[str], group: list[str], stages: list[str]) -> list[str]:
    """`cmd` running `stages` instead of its `group`."""
    return [c if c != ",".join(group) else ",".join(stages) for c in cmd]


RETRY_ENV = "LCC_BENCH_RETRY"  # why a worker runs again as it was; its records carry it as `retried`


def _read_back_failed(lines: list[str]) -> bool:
    """Whether a worker's output shows a cuDNN program read back from the compile cache failing its first run.
    Imports lcc_jax (and so jax) only here, after the worker has exited: the driver never starts a backend."""
    from lcc_jax.compile_cache import read_back_failure

    return any(read_back_failure(line) for line in lines)


def run_torch(shape: str, stages: list[str], out: str, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "torch.json"
        wanted = sorted({TORCH_STAGE[s] for s in stages}, key=list(TORCH_STAGE.values()).index)
        cmd = [sys.executable, "-m", "benchmarks.reference_torch", "--shape", shape, "--stages", ",".join(wanted),
               "--out", str(part), *shlex.split(args.torch_args)]
        _run(cmd, {**os.environ, "PYTHONUNBUFFERED": "1"}, args.timeout)
        if not part.exists():
            log.warning("the PyTorch reference wrote no report for %s", shape)
            return
        torch_report = read_report(part)
    write_report(out, merge_reports(read_report(out) if Path(out).exists() else None, torch_report))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES))
    parser.add_argument("--stages", default=",".join(DEFAULT_STAGES))
    parser.add_argument("--out", default="results/benchmarks.json")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="lcc_jax workload override")
    parser.add_argument("--isolate", action="store_true", help="one process per stage (clean peak memory)")
    parser.add_argument("--profile", default=None, metavar="DIR", help="profile capture and train_step into DIR")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per worker process")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run; later processes skip")
    parser.add_argument("--no-lcc", action="store_true", help="skip the lcc_jax stages")
    parser.add_argument("--torch", action="store_true", help="also run benchmarks.reference_torch")
    parser.add_argument("--torch-args", default="", help="extra arguments for benchmarks.reference_torch")
    parser.add_argument("--report", default=None, help="write RESULTS.md here from the report")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    stages = _expand([s.strip() for s in args.stages.split(",") if s.strip()])
    started = time.perf_counter()
    if args.budget:
        _DEADLINE[0] = started + args.budget
    lost = []
    for shape in shapes:
        if not args.no_lcc:
            lost += [f"{stage} on {shape}" for stage in run_lcc(shape, stages, args.out, args)]
        if args.torch:
            run_torch(shape, stages, args.out, args)
    log.info("all done in %.1f s; report %s", time.perf_counter() - started, args.out)
    if args.report and Path(args.out).exists():
        from benchmarks.report import write_results

        command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        write_results(args.out, args.report, command)
    if lost:  # the report keeps what was measured; a phase runner must not take the run as done
        log.error("failed after every retry: %s", ", ".join(lost))
        sys.exit(1)


if __name__ == "__main__":
    main()
