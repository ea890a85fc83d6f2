"""Out-of-memory errors turned into advice: which settings lower the memory of the stage that failed.

XLA reports an exhausted device as `RESOURCE_EXHAUSTED: Out of memory while trying to allocate ...`,
deep inside a stack trace. `memory_advice` names the flags of scripts/restore.py that help in that
stage (batch sizes, lengths, --remat, --dtype bf16, a bigger --mesh), with their current values.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

# Stages whose settings change no result, only memory: a finished --out can be resumed with new ones.
MEMORY_ONLY = ("capture_batch_size", "remat")


class OutOfMemory(RuntimeError):
    """A stage ran out of device (or host) memory; the message says which settings to lower."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for XLA's RESOURCE_EXHAUSTED errors (any backend) and for host MemoryError."""
    if isinstance(error, MemoryError):
        return True
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or (
        type(error).__name__ in ("XlaRuntimeError", "JaxRuntimeError") and "out of memory" in text.lower()
    )


def memory_advice(stage: str, job: Any) -> list[str]:
    """The flags that lower the memory of `stage` of `job` (a pipeline.Job), most effective first."""
    r, c = job.restore, job.calibration
    knobs: list[str]
    if stage == "load" or stage == "fold":
        knobs = []
    elif stage.startswith("eval"):
        knobs = [f"--eval-seqlen {max(r.eval_seqlen // 2, 1)} (now {r.eval_seqlen}; fewer tokens per chunk)"]
    elif stage in ("pairs", "dense_capture", "pruned_capture"):
        knobs = [f"--capture-batch-size {max(r.capture_batch_size // 2, 1)} (now {r.capture_batch_size})",
                 f"--capture-length {max(r.capture_length // 2, 1)} (now {r.capture_length})"]
    elif stage == "prune":
        knobs = [f"--nsamples {max(c.nsamples // 2, 1)} or --seqlen {max(c.seqlen // 2, 1)} "
                 f"(calibration set, now {c.nsamples} x {c.seqlen})"]
    elif stage in ("components", "probes"):
        knobs = [f"--num-probe {max(r.num_probe // 2, 1)} (now {r.num_probe})"]
    elif stage == "train":
        knobs = [] if r.remat else ["--remat (recompute layers in the backward pass)"]
        if r.batch_size > 1:
            knobs.append(f"--batch-size {r.batch_size // 2} --grad-accum {r.grad_accum * 2} "
                         f"(the same {r.batch_size * r.grad_accum} samples per step)")
        knobs.append(f"--max-length {max(r.max_length // 2, 1)} (now {r.max_length})")
        if r.compute_dtype != "bfloat16":
            knobs.append("--compute-dtype bfloat16")
    else:
        knobs = []
    if job.dtype != "bf16":
        knobs.append("--dtype bf16 (half the memory of fp32 weights)")
    if job.mesh is None:
        knobs.append("--mesh fsdp=-1 (spread weights and batches over all devices)")
    else:
        knobs.append(f"a mesh over more devices (now {dict(job.mesh.shape)}, {math.prod(job.mesh.shape.values())} "
                     "devices): more hosts, or fsdp=-1 on a bigger slice")
    return knobs


def train_memory_advice(restore: Any, dtype: str, mesh: Any) -> list[str]:
    """`memory_advice` of the train stage for callers that train without a Job (the recovery benchmark's cells, the
    ablation's grids): `restore` a RestoreConfig, `dtype` the weights' ("fp32" / "bf16")."""
    return memory_advice("train", SimpleNamespace(restore=restore, calibration=None, dtype=dtype, mesh=mesh))


def first_line(error: BaseException) -> str:
    """XLA's one-line summary of `error` (its messages run on for pages)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def out_of_memory(stage: str, job: Any, error: BaseException) -> OutOfMemory:
    """An `OutOfMemory` for `error` in `stage`, naming the knobs to turn."""
    first = first_line(error)
    where = "host" if isinstance(error, MemoryError) else "device"
    advice = "\n".join(f"  {k}" for k in memory_advice(stage, job))
    return OutOfMemory(
        f"stage {stage!r} ran out of {where} memory ({first}).\nLower its memory with:\n{advice}\n"
        f"Finished stages stay in {job.out}. --capture-batch-size, --remat and --mesh change no result, "
        "so the same --out resumes with them; other changes need a new --out (or --restart)."
    )
