"""Zero-shot scoring with a document's context shared by its choices, against one row per request.

Two parts. Counts (no model run) on the suite's documents: rows, real tokens, and padded tokens under the
ladder `choose_buckets` picks for each backend at `--batch` rows. Timing on this machine at `--limit`
documents per task: each mode compiled once, then scored `--repeats` times; the log-likelihoods of the
two modes are compared request by request and the per-task accuracies must be equal.

    LCC_DATA_DIR=../shared/data python -m benchmarks.zeroshot_sharing --limit 10 --out results.json
    python3 -m benchmarks.zeroshot_sharing --limit 0 --batch 64     # on a GPU: every document (--limit 0)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import jax
import numpy as np

import lcc_jax
from lcc_jax import compile_cache
from lcc_jax.data.runner import choose_buckets, shape_cost
from lcc_jax.eval.loglik import loglikelihood_tokens, score_rows
from lcc_jax.eval.tasks import resolve_tasks
from lcc_jax.eval.zeroshot import encoded_requests, task_results

log = logging.getLogger("benchmarks")


def counts(pairs, batch: int, max_length: int = 2048) -> list[dict]:
    out = []
    for mode, share in (("one row per request", False), ("shared contexts", True)):
        lengths = [len(r.tokens) for r in score_rows(pairs, max_length, share)]
        for backend in ("cpu", "gpu"):
            cost = shape_cost(lengths, batch, choose_buckets(lengths, batch, backend=backend))
            out.append(dict(mode=mode, ladder=backend, rows=len(lengths), tokens=cost.tokens,
                            padded_tokens=cost.padded_tokens, shapes=cost.shapes))
    return out


def timed(model, pairs, batch: int, repeats: int) -> dict:
    out = {}
    for mode, share in (("one row per request", False), ("shared contexts", True)):
        first = loglikelihood_tokens(model, pairs, batch_size=batch, share_contexts=share)
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            result = loglikelihood_tokens(model, pairs, batch_size=batch, share_contexts=share)
            runs.append(time.perf_counter() - started)
        out[mode] = dict(result=result, compile_seconds=first.compile_seconds, seconds=min(runs),
                         tokens=result.tokens, padded_tokens=result.padded_tokens, shapes=len(result.shapes))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--limit", type=int, default=10, help="documents per task for the timing (0: all)")
    parser.add_argument("--count-limit", type=int, default=0, help="documents per task for the counts (0: all)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    compile_cache.enable()
    dtype = jax.numpy.bfloat16 if args.dtype == "bf16" else jax.numpy.float32
    model, tokenizer, _ = lcc_jax.load(args.model, dtype=dtype)
    names = resolve_tasks("suite")

    all_pairs = encoded_requests(tokenizer, names, args.count_limit or None, None)[2]
    count_rows = counts(all_pairs, args.batch)
    print(f"# {args.model} {args.dtype}, backend {jax.default_backend()}, {os.cpu_count()} cores, batch {args.batch}")
    print(f"## counts: {len(all_pairs)} requests ({'every document' if not args.count_limit else args.count_limit})")
    print("| mode | ladder chosen for | rows | real tokens | padded tokens | shapes |\n|---|---|---:|---:|---:|---:|")
    for c in count_rows:
        print(f"| {c['mode']} | {c['ladder']} | {c['rows']:,} | {c['tokens']:,} | {c['padded_tokens']:,} | {c['shapes']} |")

    docs, _, pairs = encoded_requests(tokenizer, names, args.limit or None, None)
    runs = timed(model, pairs, args.batch, args.repeats)
    separate, shared = (runs[m]["result"] for m in ("one row per request", "shared contexts"))
    diff = float(np.max(np.abs(separate.loglik - shared.loglik)))
    accuracies = {label: {name: r.acc for name, r in task_results(docs, result.loglik).items()}
                  for label, result in (("separate", separate), ("shared", shared))}
    print(f"## timing: {len(pairs)} requests ({args.limit or 'all'} documents per task), best of {args.repeats}")
    print("| mode | rows' real tokens | padded tokens | shapes | compile s (first call) | scoring s |\n"
          "|---|---:|---:|---:|---:|---:|")
    for mode, r in runs.items():
        print(f"| {mode} | {r['tokens']:,} | {r['padded_tokens']:,} | {r['shapes']} | {r['compile_seconds']:.1f} | "
              f"{r['seconds']:.2f} |")
    same = accuracies["separate"] == accuracies["shared"]
    print(f"largest |log-likelihood difference| {diff:.2e}; per-task accuracies {'equal' if same else 'DIFFER'}")
    if args.out:
        record = dict(model=args.model, dtype=args.dtype, backend=jax.default_backend(), batch=args.batch,
                      counts=count_rows, limit=args.limit, requests=len(pairs), max_abs_loglik_diff=diff,
                      accuracies=accuracies, accuracies_equal=same,
                      timing={m: {k: v for k, v in r.items() if k != "result"} for m, r in runs.items()})
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
    if not same:
        raise SystemExit("shared-context scoring changed an accuracy")


if __name__ == "__main__":
    main()
