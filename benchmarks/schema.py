"""The report's shape, shared with the PyTorch reference, and its JSON files; no jax or torch imports.

Report: {"device", "versions", "peak_bf16_tflops", "date", "records": [...]}; a record has "stage",
"impl" ("lcc_jax", "torch_reference", "torch_batched"), "shape", "seconds", "tokens_per_s",
"samples_per_s", "steps_per_s", "mfu" (0-1), "model_flops", "peak_mem_gib", "extrapolated", "notes",
and stage-specific extras ("variant", "cold_seconds", ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STAGES = ("capture", "train_step", "wanda", "sparsegpt_layer", "sparsegpt_model", "job")
ALIASES = {"sparsegpt": ("sparsegpt_layer", "sparsegpt_model"), "train": ("train_step",)}


def expand_stages(names: Sequence[str]) -> list[str]:
    """Stage names with aliases expanded ("sparsegpt" = layer + model), each once, in the given order."""
    out: list[str] = []
    for name in names:
        for stage in ALIASES.get(name, (name,)):
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r}; known: {', '.join([*STAGES, *ALIASES])}")
            if stage not in out:
                out.append(stage)
    return out


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def write_report(path: str | os.PathLike, report: dict[str, Any]) -> None:
    """Write atomically: a reader (or a killed run) sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def merge_reports(base: dict[str, Any] | None, other: dict[str, Any]) -> dict[str, Any]:
    """`base` with `other`'s records appended; versions merged, other's peak kept as peak_bf16_tflops_<impl>."""
    if base is None:
        return {**other, "records": list(other["records"])}
    merged = {**base, "versions": {**other.get("versions", {}), **base.get("versions", {})},
              "records": [*base["records"], *other["records"]]}
    impls = sorted({r["impl"] for r in other["records"]} - {r["impl"] for r in base["records"]})
    if other.get("peak_bf16_tflops") is not None and impls:
        merged[f"peak_bf16_tflops_{impls[0].split('_')[0]}"] = other["peak_bf16_tflops"]
    return merged


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
