"""Command line: build one random model, run the chosen stages, print a table, write the JSON report.

  python -m benchmarks.reference_torch --shape llama2-7b --stages capture,train,wanda,sparsegpt,job \
      --out results.json [--fraction 0.05] [--device cuda]

Every flag maps onto a `BenchConfig` field (tuples as comma-separated lists).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

import torch

from .config import BenchConfig
from .model import build_model
from .records import format_table, report, write_report
from .shapes import SHAPES, get_shape
from .stages import STAGE_RUNNERS, expand_stages
from .timing import measure_peak_tflops

log = logging.getLogger("benchmarks.reference_torch")


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, str | None]:
    """(config, output path) from the command line; defaults come from `BenchConfig`."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reference_torch",
                                     description="PyTorch reference RestoreLCC benchmarks (random weights).")
    for field in dataclasses.fields(BenchConfig):
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, tuple):
            parser.add_argument(flag, default=",".join(field.default), help="comma-separated (default: %(default)s)")
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default, help="(default: %(default)s)")
    parser.add_argument("--out", default=None, help="JSON report path")
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    for field in dataclasses.fields(BenchConfig):
        if isinstance(field.default, tuple):
            args[field.name] = tuple(x.strip() for x in args[field.name].split(",") if x.strip())
    config = BenchConfig(**args)
    if config.shape not in SHAPES:
        parser.error(f"unknown shape {config.shape!r}; known: {', '.join(SHAPES)}")
    return config, out


def run(config: BenchConfig, out: str | None = None) -> dict:
    """Runs `config`'s stages on one model and returns the report (rewritten to `out` after every stage, so a
    run stopped by a time limit keeps what it measured)."""
    stages = expand_stages(config.stages)
    device = torch.device(config.device)
    shape = get_shape(config.shape)
    torch.manual_seed(config.seed)
    peak = measure_peak_tflops(device, config.peak_matmul_size)
    model = build_model(shape, device)
    records = []
    for stage in stages:
        start = time.perf_counter()
        log.info("stage %s ...", stage)
        records += STAGE_RUNNERS[stage](model, shape, device, config, peak)
        log.info("stage %s done in %.1f s", stage, time.perf_counter() - start)
        if out:
            write_report(out, report(device, peak, records))
    return report(device, peak, records)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config, out = parse_args(argv)
    result = run(config, out)
    print(f"{result['device']}  peak bf16 {result['peak_bf16_tflops'] or '-'} TFLOP/s  {result['versions']}")
    print(format_table(result["records"]))
    if out:
        write_report(out, result)
        log.info("wrote %s", out)
