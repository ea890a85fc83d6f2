#!/usr/bin/env python
"""Perplexity table of pruning methods: dense, then each (method, sparsity) setting, on one model.

Each setting prunes a fresh copy of the dense model with the same calibration tokens, then measures
WikiText-2 perplexity (seqlen 2048, Wanda protocol). Writes table.md and table.json into --out,
resuming: settings already in table.json are skipped.

Examples:
  python scripts/prune_table.py --out out/table                      # SmolLM2-135M, the default settings
  python scripts/prune_table.py --settings wanda:0.5,sparsegpt:2:4 --limit-chunks 32 --nsamples 16 --out out/t
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from lcc_jax.cli import ArgumentParser, script
from lcc_jax.errors import UserError

DEFAULT_SETTINGS = (
    "magnitude:0.5,wanda:0.5,sparsegpt:0.5,"
    "magnitude:4:8,wanda:4:8,sparsegpt:4:8,"
    "magnitude:2:4,wanda:2:4,sparsegpt:2:4,"
    "flap:0.2"
)


def parse_settings(text: str) -> list[tuple[str, str]]:
    """'wanda:0.5,sparsegpt:2:4,flap:0.2' -> [('wanda', '0.5'), ('sparsegpt', '2:4'), ('flap', '0.2')]; each checked."""
    settings = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        method, _, amount = item.partition(":")
        if not amount:
            raise UserError(f"setting {item!r} needs METHOD:SPARSITY, e.g. wanda:0.5 or sparsegpt:2:4")
        prune_kwargs(method, amount)  # an unknown method or a bad amount fails now, not after the dense model's eval
        settings.append((method, amount))
    return settings


def prune_kwargs(method: str, amount: str) -> dict:
    """The `prune(...)` arguments of one setting, checked by PruneConfig."""
    from lcc_jax.pruning.api import PruneConfig

    if method != "flap":
        kwargs = dict(sparsity=amount)
    else:
        try:
            kwargs = dict(structured=float(amount), sparsity=None)
        except ValueError:
            raise UserError(f"setting 'flap:{amount}' needs a ratio of parameters to remove, e.g. flap:0.2") from None
    PruneConfig(method=method, **kwargs)
    return kwargs


@script  # a user's mistake: one 'error:' line and exit code 2 (lcc_jax.cli.run_main)
def main(argv=None) -> int:
    from lcc_jax.cli import add_compile_cache_flag, add_dataclass_flags, dataclass_from_flags, use_compile_cache
    from lcc_jax.data.calibration import CalibrationConfig

    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="comma list of METHOD:SPARSITY")
    parser.add_argument("--limit-chunks", type=int, default=None, help="WikiText-2 chunks (default: all)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration and evaluation batch")
    add_compile_cache_flag(parser)
    add_dataclass_flags(parser, CalibrationConfig)
    args = parser.parse_args(argv)
    settings = parse_settings(args.settings)
    calibration = dataclass_from_flags(CalibrationConfig, args)

    import jax.numpy as jnp

    import lcc_jax
    from lcc_jax.convert.load import check_source
    from lcc_jax.eval.perplexity import perplexity
    from lcc_jax.progress import setup_logging
    from lcc_jax.pruning.api import prune
    from lcc_jax.pruning.masks import sparsity_report

    setup_logging()
    use_compile_cache(args)
    log = logging.getLogger("prune_table")
    check_source(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "table.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32

    def evaluate(model, tokenizer) -> float:
        return perplexity(model, tokenizer, "wikitext2", seqlen=2048, limit_chunks=args.limit_chunks,
                          batch_size=args.batch_size).ppl

    _, tokenizer, _ = lcc_jax.load(args.model, dtype=dtype)
    tokens = None
    for method, amount in [("dense", "0")] + settings:
        key = f"{method}:{amount}"
        if key in results:
            log.info("%s: done before (ppl %.3f)", key, results[key]["ppl"])
            continue
        model, _, _ = lcc_jax.load(args.model, dtype=dtype, tokenizer=False)
        start = time.perf_counter()
        sparsity = 0.0
        if method != "dense":
            if tokens is None and method != "magnitude":
                tokens = calibration.tokens(tokenizer)
            result = prune(model, tokens, method=method, batch_size=args.batch_size, **prune_kwargs(method, amount))
            model = result.model
            sparsity = sparsity_report(model).total if method != "flap" else None
        seconds = time.perf_counter() - start
        ppl = evaluate(model, tokenizer)
        results[key] = {"method": method, "sparsity": amount, "ppl": ppl, "prune_seconds": seconds,
                        "measured_sparsity": sparsity, "num_params": _count(model)}
        log.info("%s: ppl %.3f (pruned in %.1f s)", key, ppl, seconds)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    table = ["| method | sparsity | WikiText-2 ppl | prune time (s) | params |", "|---|---|---|---|---|"]
    for r in results.values():
        table.append(f"| {r['method']} | {r['sparsity']} | {r['ppl']:.2f} | {r['prune_seconds']:.1f} | {r['num_params'] / 1e6:.1f} M |")
    (args.out / "table.md").write_text("\n".join(table) + "\n")
    meta = {"model": args.model, "calibration": vars(calibration), "limit_chunks": args.limit_chunks, "dtype": args.dtype}
    (args.out / "table_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print("\n".join(table))
    return 0


def _count(model) -> int:
    from lcc_jax.sharding import flat_params

    return int(sum(v.size for v in flat_params(model).values()))


if __name__ == "__main__":
    sys.exit(main())
