"""RESULTS.md from benchmark reports: lcc_jax against the PyTorch reference, per stage and shape, with the targets.

  python -m benchmarks.report results/h200.json [more.json ...] --out benchmarks/RESULTS.md \
      [--command "the command that produced the reports"] [--notes notes.md] [--peak-tflops 675.8]

Pairing: every lcc_jax record meets the torch_reference and torch_batched records of its stage and
shape (of its variant, where the other side has that variant; for the job, the reference's
full-size extrapolation). The speed-up is the ratio of throughputs where both sides report one
(tokens/s, else samples/s, else steps/s: the workloads may differ in size but not in kind), else the
inverse ratio of seconds (same work on both sides). jax-free: runs anywhere.
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.schema import STAGES, merge_reports, read_report

LCC, REFERENCE, BATCHED = "lcc_jax", "torch_reference", "torch_batched"
RATES = ("tokens_per_s", "samples_per_s", "steps_per_s")
TARGET_SHAPE = "llama2-7b"
MFU_TARGETS = {"train_step": 0.45, "capture": 0.50}
SPEEDUP_TARGETS = {REFERENCE: 3.0, BATCHED: 1.5}
JOB_SECONDS, JOB_GIB = 180.0, 80.0


def counterpart(record: dict[str, Any], others: Sequence[dict[str, Any]], impl: str) -> dict[str, Any] | None:
    """The `impl` record to compare `record` with: same stage and shape, same variant when there is one."""
    pool = [r for r in others if r["impl"] == impl and r["stage"] == record["stage"] and r["shape"] == record["shape"]]
    if record["stage"] == "job":
        full = [r for r in pool if r.get("extrapolated")] or pool
        return full[0] if full else None
    same = [r for r in pool if r.get("variant") == record.get("variant")]
    return (same or pool or [None])[0]


def speedup(ours: dict[str, Any], theirs: dict[str, Any] | None) -> float | None:
    """How many times faster `ours` is than `theirs` (throughput ratio, else seconds ratio)."""
    if theirs is None:
        return None
    for key in RATES:
        if ours.get(key) and theirs.get(key):
            return ours[key] / theirs[key]
    if ours.get("seconds") and theirs.get("seconds"):
        return theirs["seconds"] / ours["seconds"]
    return None


def rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per lcc_jax record, with its counterparts and speed-ups, in stage then shape order."""
    ours = [r for r in records if r["impl"] == LCC and r["stage"] in STAGES]  # the per-stage benchmarks only
    ours.sort(key=lambda r: (STAGES.index(r["stage"]), r["shape"], str(r.get("variant", ""))))
    out = []
    for r in ours:
        ref, batched = counterpart(r, records, REFERENCE), counterpart(r, records, BATCHED)
        out.append({"ours": r, "reference": ref, "batched": batched,
                    "x_reference": speedup(r, ref), "x_batched": speedup(r, batched)})
    return out


def _num(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def _rate(r: dict[str, Any] | None) -> str:
    if r is None:
        return "–"
    for key, unit in (("tokens_per_s", "tok/s"), ("samples_per_s", "samples/s"), ("steps_per_s", "steps/s")):
        if r.get(key):
            return f"{r[key]:,.0f} {unit}" if r[key] >= 100 else f"{r[key]:.2f} {unit}"
    return f"{r['seconds']:.1f} s" + (" (extrap.)" if r.get("extrapolated") else "")


def _seconds(r: dict[str, Any] | None) -> str:
    if r is None:
        return "–"
    return f"{r['seconds']:.2f}" + ("*" if r.get("extrapolated") else "")


def table(table_rows: Sequence[dict[str, Any]]) -> str:
    head = ("| stage | shape | variant | lcc_jax s | lcc_jax rate | MFU | peak GiB | cold s | reference s | "
            "reference rate | × reference | batched rate | × batched |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in table_rows:
        r, ref, bat = row["ours"], row["reference"], row["batched"]
        lines.append(
            f"| {r['stage']} | {r['shape']} | {r.get('variant', '')} | {_seconds(r)} | {_rate(r)} | "
            f"{_num(r.get('mfu'), '.1%')} | {_num(r.get('peak_mem_gib'), '.1f')} | "
            f"{_num(r.get('cold_seconds'), '.1f')} | {_seconds(ref)} | {_rate(ref)} | "
            f"{_num(row['x_reference'], '.2f')} | {_rate(bat)} | {_num(row['x_batched'], '.2f')} |")
    return "\n".join(lines)


def targets(table_rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per speed target (MFU_TARGETS, SPEEDUP_TARGETS) on the 7B shape: met, or missed by how much."""
    lines = []
    for row in table_rows:
        r = row["ours"]
        if r["shape"] != TARGET_SHAPE:
            continue
        name = f"{r['stage']} {r.get('variant', '')}".strip()
        goal = MFU_TARGETS.get(r["stage"])
        if goal is not None and r.get("mfu") is not None:
            lines.append(_verdict(f"{name}: MFU {r['mfu']:.1%} (target ≥ {goal:.0%})", r["mfu"] >= goal,
                                  f"{goal / r['mfu']:.2f}× short"))
        if r["stage"] == "job":
            lines.append(_verdict(f"job: {r['seconds']:.0f} s (target ≤ {JOB_SECONDS:.0f} s)",
                                  r["seconds"] <= JOB_SECONDS, f"{r['seconds'] - JOB_SECONDS:.0f} s over"))
            if r.get("seconds_with_prune") is not None:
                with_prune = r["seconds_with_prune"]
                lines.append(_verdict(f"job with Wanda pruning in it: {with_prune:.0f} s (target ≤ {JOB_SECONDS:.0f} s)",
                                      with_prune <= JOB_SECONDS, f"{with_prune - JOB_SECONDS:.0f} s over"))
            if r.get("peak_mem_gib") is not None:
                lines.append(_verdict(f"job: peak {r['peak_mem_gib']:.1f} GiB (target ≤ {JOB_GIB:.0f} GB)",
                                      r["peak_mem_gib"] * 2**30 <= JOB_GIB * 1e9, "over"))
        for impl, key in ((REFERENCE, "x_reference"), (BATCHED, "x_batched")):
            want = 1.0 if (r["stage"] == "sparsegpt_layer" and impl == REFERENCE) else SPEEDUP_TARGETS[impl]
            if row[key] is not None:
                lines.append(_verdict(f"{name}: {row[key]:.2f}× {impl} (target ≥ {want:g}×)", row[key] >= want,
                                      f"{want / row[key]:.2f}× short"))
    return lines


def _verdict(text: str, met: bool, shortfall: str) -> str:
    return f"- {'met' if met else 'MISSED'}: {text}" + ("" if met else f" — {shortfall}")


def render(report: dict[str, Any], command: str | None = None, notes: str | None = None) -> str:
    table_rows = rows(report["records"])
    versions = ", ".join(f"{k} {v}" for k, v in sorted(report.get("versions", {}).items()) if v)
    peaks = [f"{report[key]:.4g} TFLOP/s ({who} process)" for key, who in
             (("peak_bf16_tflops", "lcc_jax"), ("peak_bf16_tflops_torch", "torch")) if report.get(key)]
    parts = [
        "# lcc_jax benchmarks",
        "",
        f"Device: {report.get('device', '?')}. Measured: {report.get('date', '?')}. Written "
        f"{datetime.date.today().isoformat()} by `python -m benchmarks.report`.",
        "",
        f"Versions: {versions}.",
        "",
        f"Measured dense bf16 matmul peak (the MFU denominator): {'; '.join(peaks) or 'not measured'}.",
        "",
        f"Reproduce: `{command}`" if command else "",
        "",
        "Speed-ups (×) are lcc_jax over the PyTorch pipeline (`benchmarks/reference_torch`): throughput ratios, "
        "or seconds ratios for fixed work. MFU counts the model FLOPs actually needed on real tokens "
        "(`model_flops`: 2·P per token forward, 4·P with the backward to activations, plus causal attention), "
        "against the measured peak. `*`: extrapolated. `cold s`: the first run, compilation included.",
        "",
        table(table_rows),
        "",
        "## Targets (7B shape)",
        "",
        *(targets(table_rows) or ["- no 7B records in this report"]),
        "",
    ]
    if notes:
        parts += ["## Notes", "", notes.strip(), ""]
    record_notes = sorted({f"- {r['impl']} {r['stage']}: {r['notes']}" for r in report["records"] if r.get("notes")})
    parts += ["## What each record measured", "", *record_notes, ""]
    return "\n".join(p for p in parts if p is not None)


def with_peak(report: dict[str, Any], peak_tflops: float) -> dict[str, Any]:
    """`report` with every MFU recomputed as model_flops / seconds / `peak_tflops`, for reports whose own
    process measured a wrong peak (the first H200 runs timed a mixed bf16 x fp32 product)."""
    records = [{**r, "mfu": r["model_flops"] / r["seconds"] / (peak_tflops * 1e12)}
               if r.get("model_flops") and r.get("seconds") else r for r in report["records"]]
    return {**report, "records": records, "peak_bf16_tflops": peak_tflops}


def write_results(report_paths: str | Sequence[str], out: str, command: str | None = None,
                  notes_path: str | None = None, peak_tflops: float | None = None) -> None:
    paths = [report_paths] if isinstance(report_paths, str) else list(report_paths)
    merged = None
    for path in paths:
        merged = merge_reports(merged, read_report(path))
    if peak_tflops is not None:
        merged = with_peak(merged, peak_tflops)
    notes = Path(notes_path).read_text() if notes_path else None
    Path(out).write_text(render(merged, command, notes))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    parser.add_argument("--command", default=None, help="the command that produced the reports")
    parser.add_argument("--notes", default=None, help="a Markdown file of analysis to include")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="recompute every MFU against this bf16 peak instead of the reports' own")
    args = parser.parse_args(argv)
    write_results(args.reports, args.out, args.command, args.notes, args.peak_tflops)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
