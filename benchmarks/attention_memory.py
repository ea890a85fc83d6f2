"""The train step's memory on XLA attention, keeping its scores for the backward pass or recomputing them.

A GPU trains on XLA attention where cuDNN does not apply (fp32 compute, a refused kernel, the benchmark's fallback
retry); on 2026-12-08 that retry of the Llama-2-7B-shape job asked an H100 for 52.93 GiB in its train step and
failed. XLA's attention now recomputes its scores in the backward pass (`lcc_jax.models.attention`). This compiles
the job's train step (`benchmarks.restore_large.train_program`: the trainer's own step, one packed row of `--seq`
tokens, the paper's top-k heads, no remat) from shapes alone, once each way, and reads XLA's memory analysis: no
weights are made, so it runs on any machine. On a CPU the compiler's temporaries overstate a GPU's (it upcasts bf16
matmul operands to fp32), but the difference between the two programs is the attention's saved scores.

    python -m benchmarks.attention_memory --shape llama2-7b --seq 3072 --out benchmarks/results/cpu-2026-12-08/attention_memory.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import jax

from benchmarks.common import get_shape
from benchmarks.restore_large import _stats, default_work, train_program
from benchmarks.scaling import device_mesh
from lcc_jax.models.attention import attention_implementation, recomputed_scores
from lcc_jax.train.steps import _compiled

log = logging.getLogger("benchmarks.attention_memory")
GIB = 1024**3


def measure(shape_name: str, seq: int, recompute: bool) -> dict:
    """XLA's memory analysis of the train step on one device, XLA attention, scores recomputed or kept."""
    shape = get_shape(shape_name)
    work = default_work(shape_name)
    work = work.replace(train_batch=1, train_max_len=seq)  # one packed row of `seq` tokens
    jax.clear_caches()  # the trace must see this variant's context (jit caches traces by function)
    _compiled.cache_clear()
    started = time.perf_counter()
    with recomputed_scores(recompute), attention_implementation("xla"):
        compiled, batch_shape = train_program(shape, device_mesh((1, 1, 1)), work)
    stats = _stats(compiled)
    return {"shape": shape.name, "batch_shape": list(batch_shape), "recompute_scores": recompute,
            "compile_seconds": round(time.perf_counter() - started, 1), "memory": stats,
            "temp_gib": None if stats is None else round(stats["temp"] / GIB, 2), "tflops": _tflops(compiled)}


def _tflops(compiled) -> float | None:
    """XLA's count of the step's floating-point operations (what recomputing adds), in TFLOP."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return round(float(cost["flops"]) / 1e12, 3)
    except Exception:  # noqa: BLE001 - backends without a cost model
        return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--seq", type=int, default=3072,
                        help="tokens of the packed row, rounded up to a multiple of 256 (the 7B job's longest: 3072)")
    parser.add_argument("--out", default=None, help="write the two records here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    records = [measure(args.shape, args.seq, recompute) for recompute in (False, True)]
    kept, recomputed = (r["memory"]["temp"] if r["memory"] else None for r in records)
    for r in records:
        log.info("%s, %s tokens, scores %s: temporaries %s GiB, %s TFLOP (compiled in %.1f s)", r["shape"], args.seq,
                 "recomputed" if r["recompute_scores"] else "kept", r["temp_gib"], r["tflops"], r["compile_seconds"])
    if kept and recomputed:
        log.info("recomputing saves %.2f GiB of temporaries (%.1fx less)", (kept - recomputed) / GIB, kept / recomputed)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"backend": jax.default_backend(), "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
