"""Zero-shot scoring with a document's context shared by its choices (and shared rows packed several to a batch
line), against one row per request.

Two parts. Counts (no model run) on the suite's documents: rows, real tokens, and padded tokens and compiled
shapes under the ladder `choose_buckets` picks for each backend at `--batch` rows. Timing on this machine at
`--limit` documents per task: each mode compiled once, then scored `--repeats` times; the log-likelihoods of the
modes are compared request by request with one row per request, and the per-task accuracies must be equal.

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
from lcc_jax.eval.loglik import (
    attention_length_of,
    loglikelihood_tokens,
    pack_length,
    pack_rows,
    prepare_batches,
    score_rows,
)
from lcc_jax.eval.tasks import resolve_tasks
from lcc_jax.eval.zeroshot import encoded_requests, task_results

log = logging.getLogger("benchmarks")

MODES = {"one row per request": dict(share_contexts=False), "shared contexts": dict(pack=False),
         "shared contexts, packed": {}}  # loglikelihood_tokens' arguments


def counts(pairs, batch: int, max_length: int = 2048, attention_length: float | None = None) -> list[dict]:
    out = []
    for mode, kwargs in MODES.items():
        share = kwargs.get("share_contexts", True)
        scored = score_rows(pairs, max_length, share)
        for backend in ("cpu", "gpu"):
            rows = scored
            if share and kwargs.get("pack", True):  # the packed length is priced for the backend too
                rows = pack_rows(rows, pack_length([len(r.tokens) for r in rows], batch, backend=backend,
                                                   attention_length=attention_length))
            batches, _ = prepare_batches(rows, batch, 0, share, backend=backend)
            out.append(dict(mode=mode, ladder=backend, rows=len(rows), tokens=int(sum(len(r.tokens) for r in rows)),
                            padded_tokens=int(sum(b.tokens.size for b in batches)),
                            shapes=len({b.shape for b in batches})))
    return out


def timed(model, pairs, batch: int, repeats: int) -> dict:
    out = {}
    for mode, kwargs in MODES.items():
        first = loglikelihood_tokens(model, pairs, batch_size=batch, **kwargs)
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            result = loglikelihood_tokens(model, pairs, batch_size=batch, **kwargs)
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
    count_rows = counts(all_pairs, args.batch, attention_length=attention_length_of(model.config))
    print(f"# {args.model} {args.dtype}, backend {jax.default_backend()}, {os.cpu_count()} cores, batch {args.batch}")
    print(f"## counts: {len(all_pairs)} requests ({'every document' if not args.count_limit else args.count_limit})")
    print("| mode | ladder chosen for | rows | real tokens | padded tokens | shapes |\n|---|---|---:|---:|---:|---:|")
    for c in count_rows:
        print(f"| {c['mode']} | {c['ladder']} | {c['rows']:,} | {c['tokens']:,} | {c['padded_tokens']:,} | {c['shapes']} |")

    docs, _, pairs = encoded_requests(tokenizer, names, args.limit or None, None)
    runs = timed(model, pairs, args.batch, args.repeats)
    separate = runs["one row per request"]["result"]
    diffs = {m: float(np.max(np.abs(separate.loglik - r["result"].loglik))) for m, r in runs.items()}
    accuracies = {m: {name: t.acc for name, t in task_results(docs, r["result"].loglik).items()}
                  for m, r in runs.items()}
    print(f"## timing: {len(pairs)} requests ({args.limit or 'all'} documents per task), best of {args.repeats}")
    print("| mode | rows' real tokens | padded tokens | shapes | compile s (first call) | scoring s | "
          "max abs log-lik. diff. |\n|---|---:|---:|---:|---:|---:|---:|")
    for mode, r in runs.items():
        print(f"| {mode} | {r['tokens']:,} | {r['padded_tokens']:,} | {r['shapes']} | {r['compile_seconds']:.1f} | "
              f"{r['seconds']:.2f} | {diffs[mode]:.2e} |")
    same = all(a == accuracies["one row per request"] for a in accuracies.values())
    print(f"per-task accuracies {'equal' if same else 'DIFFER'} in every mode")
    if args.out:
        record = dict(model=args.model, dtype=args.dtype, backend=jax.default_backend(), batch=args.batch,
                      counts=count_rows, limit=args.limit, requests=len(pairs), max_abs_loglik_diff=diffs,
                      accuracies=accuracies, accuracies_equal=same,
                      timing={m: {k: v for k, v in r.items() if k != "result"} for m, r in runs.items()})
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
    if not same:
        raise SystemExit("shared-context or packed scoring changed an accuracy")


if __name__ == "__main__":
    main()
