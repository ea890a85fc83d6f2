"""Profile a piece of work on the device and summarise where the device time went, with no viewer needed.

`profiled(fn, folder)` runs `fn` under `jax.profiler.trace(..., create_perfetto_trace=True)` and reads the
Perfetto (Chrome JSON) trace it writes: kernels and XLA ops of the device lanes, summed by name. The
summary (top entries, their share of device time, and busy time against wall time) goes into the
benchmark record, so the profile travels in the JSON report even where the trace files cannot.
"""

from __future__ import annotations

import collections
import gzip
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger("benchmarks")

DEVICE_WORDS = ("gpu", "device", "stream", "tpu")


def profiled(fn: Callable[[], Any], folder: str | Path, top: int = 15) -> dict[str, Any]:
    """Run `fn()` under the profiler (output ready before the trace stops); a summary of its device time."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with jax.profiler.trace(str(folder), create_perfetto_trace=True):
        jax.block_until_ready(fn())
    wall = time.perf_counter() - started
    traces = sorted(folder.rglob("*.trace.json.gz")) or sorted(folder.rglob("perfetto_trace.json.gz"))
    if not traces:
        return {"error": f"no trace file under {folder}", "wall_seconds": wall}
    return summarize(traces[-1], wall, top)


def summarize(path: str | Path, wall_seconds: float | None = None, top: int = 12, lanes: int = 4) -> dict[str, Any]:
    """Device time by op name, per lane (a device's threads: streams, "XLA Ops", ...), busiest lanes first.

    {"wall_seconds", "lanes": {"<process> / <thread>": {"busy_seconds", "top": [[name, seconds, share], ...]}}}
    """
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {e["pid"]: str(e.get("args", {}).get("name", "")) for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): str(e.get("args", {}).get("name", "")) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = {pid for pid, name in processes.items()
              if any(w in name.lower() for w in DEVICE_WORDS) and "host" not in name.lower()}
    totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device and "dur" in e:
            lane = f"{processes[e['pid']]} / {threads.get((e['pid'], e.get('tid')), e.get('tid'))}"
            totals[lane][_short(str(e.get("name", "?")))] += e["dur"] * 1e-6
    busiest = sorted(totals, key=lambda lane: -sum(totals[lane].values()))[:lanes]
    summary = {}
    for lane in busiest:
        busy = sum(totals[lane].values())
        summary[lane] = {"busy_seconds": round(busy, 6),
                         "top": [[name, round(sec, 6), round(sec / busy, 4)] for name, sec in totals[lane].most_common(top)]}
    return {"wall_seconds": wall_seconds, "lanes": summary}


def _short(name: str, width: int = 120) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."
