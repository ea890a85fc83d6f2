"""What a fresh evaluating process does before its first zero-shot batch, timed part by part.

Each of `--processes` runs is a new Python process (so the token cache is read back as a warm process reads it,
with nothing yet on the heap): load the model (weights and tokenizer), read the suite's documents and their cached token
pairs (`eval.zeroshot.encoded_requests`), build the score rows and pack them (`eval.loglik.score_rows`, `pack_rows`), pad them into
batches and build each batch's score arrays. No model runs. The issue-16 target of ≤ 10 s for a warm suite
process includes all of this; the figures are printed as JSON lines and, with --out, written there.

    LCC_DATA_DIR=../shared/data python -m benchmarks.zeroshot_prep --processes 3 --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def one_process(model: str, tasks: str, batch: int) -> dict:
    """The parts' seconds in this process."""
    import lcc_jax
    from lcc_jax.eval import loglik
    from lcc_jax.eval.tasks import resolve_tasks
    from lcc_jax.eval.zeroshot import encoded_requests

    clock = time.perf_counter
    started = clock()
    loaded_model, tokenizer, _ = lcc_jax.load(model)  # weights too, as the evaluating process loads them
    loaded = clock()
    docs, requests, pairs = encoded_requests(tokenizer, resolve_tasks(tasks), None, None)
    read = clock()
    rows = loglik.score_rows(pairs, 2048, True)
    rows = loglik.pack_rows(rows, loglik.pack_length(  # as scoring does
        [len(r.tokens) for r in rows], batch, attention_length=loglik.attention_length_of(loaded_model.config)))
    built = clock()
    batches, _ = loglik.prepare_batches(rows, batch, pad_id=0)
    done = clock()
    return {"requests": len(requests), "documents": sum(len(d) for d in docs.values()), "rows": len(rows),
            "batches": len(batches), "load_s": round(loaded - started, 3),
            "documents_and_pairs_s": round(read - loaded, 3),
            "score_rows_s": round(built - read, 3), "batches_and_arrays_s": round(done - built, 3),
            "total_s": round(done - started, 3)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="suite")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--processes", type=int, default=3, help="fresh processes to time (the first may tokenize "
                        "and fill the token cache; it is reported apart)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_process(args.model, args.tasks, args.batch)))
        return
    runs = []
    for i in range(args.processes):
        command = [sys.executable, "-m", "benchmarks.zeroshot_prep", "--child", "--model", args.model,
                   "--tasks", args.tasks, "--batch", str(args.batch)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
        print(json.dumps({"process": i, **runs[-1]}))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "tasks": args.tasks, "batch": args.batch,
                                        "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
