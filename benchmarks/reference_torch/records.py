"""Result records and the JSON report shared with the lcc_jax benchmarks.

Report: {"device", "versions", "peak_bf16_tflops", "records": [record, ...]}. Every record has the
keys of `record()` (None where a figure does not apply) plus stage-specific extras.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
import transformers

STAGES = ("capture", "train_step", "wanda", "sparsegpt_layer", "sparsegpt_model", "job")


def record(stage: str, impl: str, shape: str, seconds: float, *, tokens: float | None = None,
           samples: float | None = None, steps: float | None = None, model_flops: float | None = None,
           mfu: float | None = None, peak_mem_gib: float | None = None, extrapolated: bool = False,
           notes: str = "", **extra: Any) -> dict[str, Any]:
    """One measurement; rates are the given counts over `seconds`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")

    def rate(count: float | None) -> float | None:
        return None if count is None or seconds <= 0 else count / seconds

    return {"stage": stage, "impl": impl, "shape": shape, "seconds": seconds,
            "tokens_per_s": rate(tokens), "samples_per_s": rate(samples), "steps_per_s": rate(steps),
            "mfu": mfu, "model_flops": model_flops, "peak_mem_gib": peak_mem_gib,
            "extrapolated": extrapolated, "notes": notes, **extra}


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the host CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def versions() -> dict[str, str | None]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda}


def report(device: torch.device, peak_tflops: float | None, records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"device": device_name(device), "versions": versions(), "peak_bf16_tflops": peak_tflops,
            "records": records}


def write_report(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def format_table(records: list[dict[str, Any]]) -> str:
    """A fixed-width table of the records, one line each."""
    def fmt(value: Any, spec: str) -> str:
        width = spec.lstrip(">").split(".")[0]
        return format("-", f">{width}") if value is None else format(value, spec)

    header = (f"{'stage':<16}{'impl':<16}{'variant':<14}{'seconds':>10}{'tok/s':>11}{'samp/s':>9}{'step/s':>8}"
              f"{'MFU%':>7}{'GiB':>7}  extrap.")
    lines = [header, "-" * len(header)]
    for r in records:
        mfu_pct = None if r["mfu"] is None else 100 * r["mfu"]
        lines.append(f"{r['stage']:<16}{r['impl']:<16}{str(r.get('variant', '')):<14}{r['seconds']:>10.2f}"
                     f"{fmt(r['tokens_per_s'], '>11.0f')}{fmt(r['samples_per_s'], '>9.2f')}"
                     f"{fmt(r['steps_per_s'], '>8.2f')}{fmt(mfu_pct, '>7.1f')}{fmt(r['peak_mem_gib'], '>7.1f')}"
                     f"  {'yes' if r['extrapolated'] else ''}")
    return "\n".join(lines)
