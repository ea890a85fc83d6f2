"""Run some benchmark stages for one shape in this process, appending each stage's records to a JSON report.

  python -m benchmarks.worker --shape llama2-7b --stages capture,wanda,train_step --out results/lcc.json \
      [--peak-tflops 800] [--set capture_samples=256 --set train_steps=10]

One random model serves every stage (stages may prune it in place; speed does not depend on the
values). Records are written after every stage, so a killed run keeps what it measured. A failing
stage is logged and skipped; the exit status is then 1 and the failed stages are listed on the last
line (`FAILED: a,b`), which `benchmarks.run` reads to retry them. The persistent compilation cache is on as in every
script (`LCC_COMPILE_CACHE=0`, or a fresh `LCC_CACHE_DIR`, for a cold run); the job stage records each phase's
compile seconds and cache hits.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence

from benchmarks import capture, job, sparsegpt, train_step, wanda
from benchmarks.common import SHAPES, append_records
from benchmarks.schema import STAGES, expand_stages
from benchmarks.workload import Context, Workload, default_workload
from lcc_jax import compile_cache
from lcc_jax.restore.top_k import TopK

log = logging.getLogger("benchmarks")

RUNNERS: dict[str, Callable[[Context], list[dict]]] = {
    "capture": capture.bench,
    "train_step": train_step.bench,
    "wanda": wanda.bench,
    "sparsegpt_layer": sparsegpt.bench_layer,
    "sparsegpt_model": sparsegpt.bench_model,
    "job": job.bench,
}


def workload_with(work: Workload, settings: Sequence[str]) -> Workload:
    """`work` with `key=value` overrides (tuples as comma-separated lists, "none" for None)."""
    fields = {f.name: f for f in dataclasses.fields(Workload)}
    changes = {}
    for item in settings:
        key, _, text = item.partition("=")
        if key not in fields:
            raise ValueError(f"unknown workload field {key!r}; known: {', '.join(fields)}")
        current = getattr(work, key)
        if text.lower() == "none":
            changes[key] = None
        elif fields[key].type in ("str", "str | None"):
            changes[key] = text
        elif isinstance(current, tuple):
            changes[key] = tuple(x.strip() for x in text.split(",") if x.strip())
        elif isinstance(current, bool):
            changes[key] = text.lower() in ("1", "true", "yes")
        elif isinstance(current, TopK):
            changes[key] = TopK.parse(text)
        elif isinstance(current, float):
            changes[key] = float(text)
        else:
            changes[key] = int(text)
    return work.replace(**changes)


def run_stages(ctx: Context, stages: Sequence[str], out: str | None) -> list[str]:
    """Run `stages` on `ctx`, writing records as they come; returns the stages that failed."""
    failed = []
    for stage in stages:
        started = time.perf_counter()
        log.info("=== %s %s", ctx.shape.name, stage)
        try:
            records = RUNNERS[stage](ctx)
        except Exception:
            log.exception("stage %s on %s failed", stage, ctx.shape.name)
            failed.append(stage)
            continue
        if out:
            append_records(out, records, ctx.peak_tflops)
        for r in records:
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(f"RESULT {r['shape']} {r['stage']} {r.get('variant', '')}: {r['seconds']:.2f} s, MFU {mfu}, "
                  f"peak {r['peak_mem_gib'] or 0:.1f} GiB", flush=True)
        log.info("=== %s %s done in %.1f s", ctx.shape.name, stage, time.perf_counter() - started)
    return failed


def main(argv: Sequence[str] | None = None, default_stages: Sequence[str] = STAGES) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--stages", default=",".join(default_stages))
    parser.add_argument("--out", default=None, help="JSON report to append to")
    parser.add_argument("--peak-tflops", type=float, default=None, help="skip measuring the bf16 peak")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="workload override")
    parser.add_argument("--profile", default=None, metavar="DIR", help="profile capture and train_step into DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    compile_cache.enable()  # as every script: on under $LCC_CACHE_DIR unless LCC_COMPILE_CACHE=0
    stages = expand_stages([s.strip() for s in args.stages.split(",") if s.strip()])
    work = workload_with(default_workload(args.shape), args.set)
    ctx = Context.create(args.shape, work, args.peak_tflops, args.profile)
    failed = run_stages(ctx, stages, args.out)
    if failed:
        print("FAILED: " + ",".join(failed), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
