#!/usr/bin/env python
"""Perplexity of a model on WikiText-2 (or C4, or any text), by the pruning papers' protocol; zero-shot accuracy.

The text is tokenized once (with the tokenizer's default special tokens), cut into non-overlapping
--seqlen chunks (the tail is dropped) and ppl = exp(mean over chunks of each chunk's mean next-token
loss), exactly Wanda's eval_ppl_wikitext. Local data comes from $LCC_DATA_DIR (or --data-dir), laid
out like the project's shared/data folder (wikitext-2-raw/wiki.test.raw).

With --tasks, the zero-shot multiple-choice tasks are scored as lm-evaluation-harness does (its
prompts, acc and acc_norm; see lcc_jax.eval.tasks) instead of the perplexity (add --ppl for both),
from $LCC_DATA_DIR/eval/<task>/<split>.jsonl.

Examples:
  python scripts/evaluate.py                                   # SmolLM2-135M, WikiText-2 test, seqlen 2048
  python scripts/evaluate.py smollm2-135m --limit-chunks 4     # a quick look: the first 4 chunks
  python scripts/evaluate.py path/to/hf_model --dtype bf16 --mesh fsdp=-1 --batch-size 8
  python scripts/evaluate.py path/to/hf_model --data c4 --limit-chunks 256     # C4 validation, as the papers
  python scripts/evaluate.py path/to/hf_model --data my_text.raw --json out/ppl.json
  python scripts/evaluate.py smollm2-135m --tasks suite --limit 100     # zero-shot, 7-task suite
  python scripts/evaluate.py path/to/hf_model --tasks boolq,rte,piqa --ppl --batch-size 32
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path

from lcc_jax.cli import ArgumentParser, script

DTYPES = ("fp32", "bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from lcc_jax.cli import add_compile_cache_flag
    from lcc_jax.eval.perplexity import perplexity
    from lcc_jax.eval.zeroshot import zeroshot

    defaults = {k: p.default for k, p in inspect.signature(perplexity).parameters.items()}
    zs_defaults = {k: p.default for k, p in inspect.signature(zeroshot).parameters.items()}
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        nargs="?",
        default="smollm2-135m",
        help="what to load: a builtin name (smollm2-135m), a Hugging Face model folder, or anything "
        "lcc_jax.convert.load.load accepts (default: %(default)s)",
    )
    parser.add_argument(
        "--data",
        default="wikitext2",
        help="text: 'wikitext2', 'c4', a file (raw text, or .jsonl with a 'text' field), or "
        "'hf:<dataset>[:<config>]' (needs `datasets` and network) (default: %(default)s)",
    )
    parser.add_argument("--split", default=defaults["split"], choices=("train", "validation", "test"),
                        help="split of a named or hub data set; 'test' is the papers' evaluation split "
                        "(C4: validation) (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="local data folder laid out like shared/data (default: $LCC_DATA_DIR, "
                        "else ../shared/data beside the source checkout)")
    parser.add_argument("--seqlen", type=int, default=defaults["seqlen"],
                        help="tokens per chunk; the papers use 2048 (default: %(default)s)")
    parser.add_argument("--limit-chunks", type=int, default=defaults["limit_chunks"], metavar="N",
                        help="evaluate only the first N chunks (default: all; C4's protocol is 256)")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"], metavar="B",
                        help="chunks (perplexity) or requests (zero-shot) per forward pass (default: the "
                        f"mesh's batch shards, 1 without a mesh; zero-shot: {zs_defaults['batch_size']})")
    parser.add_argument("--tasks", default=None, metavar="LIST",
                        help="zero-shot tasks: 'suite' (BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c, "
                        "OBQA), 'all' (+ PIQA) or names, e.g. 'boolq,rte,piqa'. Default: perplexity only")
    parser.add_argument("--limit", type=int, default=zs_defaults["limit"], metavar="N",
                        help="zero-shot: only the first N documents of each task (default: all)")
    parser.add_argument("--max-length", type=int, default=zs_defaults["max_length"],
                        help="zero-shot: requests longer than this lose tokens on the left (default: %(default)s)")
    parser.add_argument("--ppl", action="store_true", help="with --tasks, also compute the perplexity")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32",
                        help="weights and activations; the log-softmax is always fp32 (default: %(default)s)")
    parser.add_argument("--mesh", default=None, metavar="SPEC",
                        help="shard over devices, e.g. 'fsdp=-1' or 'data=2,fsdp=4' (axes data, fsdp, "
                        "tensor; -1 takes the rest). Default: one device")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the result as JSON")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    add_compile_cache_flag(parser)
    return parser.parse_args(argv)


@script  # a user's mistake: one 'error:' line and exit code 2 (lcc_jax.cli.run_main)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.data_dir is not None:
        os.environ["LCC_DATA_DIR"] = str(args.data_dir)

    import jax.numpy as jnp

    from lcc_jax import estimate
    from lcc_jax.cli import use_compile_cache
    from lcc_jax.convert.load import load
    from lcc_jax.eval.perplexity import perplexity
    from lcc_jax.eval.tasks import resolve_tasks
    from lcc_jax.eval.zeroshot import zeroshot
    from lcc_jax.progress import plan_stage, setup_logging
    from lcc_jax.sharding import make_mesh

    setup_logging(args.log_level.upper())
    use_compile_cache(args)
    log = logging.getLogger("lcc_jax.scripts.evaluate")
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
    if args.tasks is not None:
        resolve_tasks(args.tasks)  # an unknown name fails before the model loads
    mesh = make_mesh(args.mesh) if args.mesh else None
    plan = estimate.follow_evaluation(args)  # logged; a warning when long on a CPU
    log.info("loading %s (%s%s)", args.model, args.dtype, f", mesh {dict(mesh.shape)}" if mesh else "")
    with plan_stage("load"):
        model, tokenizer, _ = load(args.model, dtype=dtype, mesh=mesh)
    record = {"model": args.model, "dtype": args.dtype, "mesh": dict(mesh.shape) if mesh else None}
    if args.tasks is None or args.ppl:
        with plan_stage("perplexity"):
            result = perplexity(
                model,
                tokenizer,
                args.data,
                seqlen=args.seqlen,
                batch_size=args.batch_size,
                limit_chunks=args.limit_chunks,
                mesh=mesh,
                split=args.split,
            )
        print(f"{args.model} [{args.dtype}] {result.summary()}")
        record.update(data=args.data, split=args.split, **result.to_dict())
    if args.tasks is not None:
        started = time.perf_counter()
        with plan_stage("zero-shot"):
            scores = zeroshot(
                model,
                tokenizer,
                args.tasks,
                limit=args.limit,
                batch_size=args.batch_size or inspect.signature(zeroshot).parameters["batch_size"].default,
                mesh=mesh,
                max_length=args.max_length,
            )
        limit = f", first {args.limit} per task" if args.limit else ""
        print(f"{args.model} [{args.dtype}] zero-shot{limit}, {time.perf_counter() - started:.0f} s:\n"
              f"{scores.to_markdown()}")
        record["zeroshot"] = scores.to_dict()
    record["estimate"] = estimate.report(plan) or None  # estimated against measured seconds, also logged
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
