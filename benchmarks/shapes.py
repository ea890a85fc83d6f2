"""Compiled shapes against padding: what each bucket ladder costs SmolLM2's zero-shot suite, capture and WikiText-2.

For each workload and ladder: distinct (batch, seq) shapes, padded tokens per real token, the seconds to
compile those shapes (each compiled alone, measured), and the seconds the padded tokens take (a measured
seconds-per-token rate x padded tokens). "before" is the ladder the caller used before lcc_jax.data.runner
(zero-shot: growth 1.25; capture: multiples of 32 to 256, then of 64); "after" is `choose_buckets` on this
backend.

    LCC_SMOLLM2_WHEEL=... LCC_DATA_DIR=... python -m benchmarks.shapes [--limit 1000] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

import lcc_jax
from lcc_jax.data.batching import bucket_lengths
from lcc_jax.data.runner import Runner, choose_buckets, ladder, padded_shapes, shape_cost
from lcc_jax.eval.loglik import _score_step, encode_requests, score_rows
from lcc_jax.eval.perplexity import _chunk_nll_step, wikitext2_test_ids
from lcc_jax.eval.tasks import load_docs, resolve_tasks
from lcc_jax.restore.capture import _tokens_and_mask, last_token_heads


def old_capture_buckets(longest: int) -> tuple[int, ...]:
    """capture.py's ladder before the runner: multiples of 32 up to 256, then of 64."""
    fine = bucket_lengths(min(longest, 256), 32)
    coarse = bucket_lengths(longest, 64) if longest > 256 else ()
    return tuple(sorted({*fine, *(b for b in coarse if b > fine[-1])}))


def zeroshot_lengths(tokenizer, limit: int, max_length: int = 2048) -> tuple[list[int], int, int]:
    """(row lengths, scored positions per row, requests per row) of the suite's first `limit` documents per task,
    as `loglik` scores them (a document's choices sharing one row where they share a context)."""
    requests = [r for name in resolve_tasks("suite") for d in load_docs(name, limit=limit) for r in d.requests]
    rows = score_rows(encode_requests(tokenizer, requests), max_length)
    scored = 1 << (max(len(r.scored) for r in rows) - 1).bit_length()
    return [len(r.tokens) for r in rows], scored, max(len(r.requests) for r in rows)


def probe_lengths(tokenizer, max_length: int = 512) -> dict[str, list[int]]:
    data = os.path.join(os.environ.get("LCC_DATA_DIR", "../shared/data"), "alpaca_2000", "train.jsonl")
    rows = [json.loads(line) for line in open(data)][:1000]  # the paper's 1,000 probing samples
    ids = lambda texts: [min(len(s), max_length) for s in tokenizer(texts)["input_ids"]]  # noqa: E731
    return {"capture q": ids([r["prompt"] for r in rows]), "capture q+r": ids([r["prompt"] + r["response"] for r in rows])}


class Timer:
    """Measured compile seconds per shape and seconds per padded token of one step."""

    def __init__(self, model, step, arrays_for):
        self.runner, self.arrays_for, self.seconds = Runner(model, step, workers=1), arrays_for, {}

    def compile(self, shape) -> float:
        if shape not in self.seconds:
            self.seconds[shape] = self.runner.compile([self.arrays_for(*shape)])[1]
        return self.seconds[shape]

    def token_seconds(self, shape, repeats: int = 3) -> float:
        self.compile(shape)
        runs = [self.runner.run([(0, self.arrays_for(*shape))], lambda *_: 0).seconds for _ in range(repeats)]
        return min(runs) / (shape[0] * shape[1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=1000, help="zero-shot documents per task")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=2048, help="WikiText-2 chunk length")
    parser.add_argument("--ppl-batch", type=int, default=8)
    parser.add_argument("--no-capture-compile", action="store_true", help="capture rows without compile times")
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    model, tokenizer, config = lcc_jax.load("smollm2-135m")
    print(f"# backend {backend}, {jax.device_count()} device(s), {os.cpu_count()} cores; SmolLM2-135M fp32, "
          f"batch {args.batch}")

    lengths, scored, slots = zeroshot_lengths(tokenizer, args.limit)
    i32 = np.int32

    def score_arrays(b, s):
        k = min(scored, s)
        return dict(tokens=np.zeros((b, s), i32), segments=np.ones((b, s), i32), branches=np.zeros((b, s), i32),
                    positions=np.zeros((b, s), i32), scored=np.zeros((b, k), i32), targets=np.zeros((b, k), i32),
                    slot=np.zeros((b, k), i32), slots=np.zeros((b, slots), np.int8))

    timers = {"zero-shot": Timer(model, _score_step, score_arrays),
              "capture": Timer(model, _tokens_and_mask(last_token_heads),
                               lambda b, s: dict(tokens=np.zeros((b, s), i32), mask=np.ones((b, s), i32)))}
    rate = {name: t.token_seconds((args.batch, 64)) for name, t in timers.items()}
    print(f"# measured seconds per padded token at ({args.batch}, 64): "
          + ", ".join(f"{k} {v:.2e}" for k, v in rate.items()))

    rows = []
    workloads = [("zero-shot", lengths, "zero-shot", ladder(max(lengths)))]
    workloads += [(name, ls, "capture", old_capture_buckets(max(ls))) for name, ls in probe_lengths(tokenizer).items()]
    print("| workload | ladder | shapes | padded / real tokens | compile s (measured) | padded-token s | total s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, ls, kind, before in workloads:
        ladders = [("before", before)] + [(f"growth {g}", ladder(max(ls), growth=g)) for g in (1.25, 1.5, 2.0)]
        ladders.append((f"after: chosen on {backend}", choose_buckets(ls, args.batch, backend=backend)))
        if backend == "cpu":  # what the same lengths get on an accelerator (its costs: runner.SHAPE/TOKEN_SECONDS)
            ladders.append(("after: chosen on gpu", choose_buckets(ls, args.batch, backend="gpu")))
        for label, buckets in ladders:
            cost = shape_cost(ls, args.batch, buckets)
            shapes = sorted(set(padded_shapes(ls, args.batch, buckets)))
            compile_s = (float("nan") if kind == "capture" and args.no_capture_compile
                         else sum(timers[kind].compile(s) for s in shapes))
            run_s = cost.padded_tokens * rate[kind]
            rows.append((name, label, cost.shapes, cost.padding, compile_s, run_s))
            print(f"| {name} | {label} | {cost.shapes} | {cost.padding:.3f} | {compile_s:.1f} | {run_s:.1f} | "
                  f"{compile_s + run_s:.1f} |", flush=True)

    ids = wikitext2_test_ids(tokenizer)
    chunks = ids.size // args.seqlen
    batches = -(-chunks // args.ppl_batch)
    ppl = Timer(model, _chunk_nll_step, lambda b, s: dict(tokens=np.zeros((b, s), i32)))
    compile_s = ppl.compile((args.ppl_batch, args.seqlen))
    again = Timer(model, _chunk_nll_step, ppl.arrays_for).compile((args.ppl_batch, args.seqlen))
    print(f"| WikiText-2 ppl ({chunks} chunks x {args.seqlen}, batch {args.ppl_batch}) | one shape | 1 | "
          f"{batches * args.ppl_batch / chunks:.3f} | {compile_s:.1f} | - | - |")
    print(f"# perplexity compile, first call {compile_s:.2f} s; a second call on the same model layout (the pipeline "
          f"evaluates three times): {again:.3f} s (before the runner each call compiled)")


if __name__ == "__main__":
    main()
