#!/usr/bin/env python
"""Prune a model (magnitude, Wanda, SparseGPT, OWL, structured) and save it with its masks.

Calibration: --nsamples windows of --seqlen tokens, seed 0, as Wanda/SparseGPT draw them. The papers use
C4 (--calibration c4, needs a local copy under $LCC_DATA_DIR/c4 or a hub); offline the default is the local
Alpaca training text. The output folder holds the Orbax model, the masks (True = keep), and meta.json
with the sparsity report; scripts/restore.py --pruned OUT picks it up.

Examples:
  python scripts/prune.py --out out/wanda50                                   # SmolLM2-135M, Wanda 50 %
  python scripts/prune.py --method sparsegpt --sparsity 2:4 --out out/sgpt24
  python scripts/prune.py --method flap --structured 0.2 --out out/flap20     # structured, shapes shrink
  python scripts/prune.py path/to/hf_model --method wanda --owl --nsamples 128 --mesh fsdp=-1 --out out/owl
  python scripts/prune.py --out out/w --export-hf out/w_hf --eval-ppl         # also a HF folder and WikiText-2 ppl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lcc_jax.cli import ArgumentParser, script


def parse_args(argv=None):
    from lcc_jax.cli import add_compile_cache_flag, add_dataclass_flags
    from lcc_jax.data.calibration import CalibrationConfig
    from lcc_jax.pruning.api import PruneConfig

    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2-135m",
                        help="built-in name, Hugging Face folder, .gguf file or hub id (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--export-hf", type=Path, default=None, metavar="DIR", help="also write a Hugging Face folder")
    parser.add_argument("--eval-ppl", action="store_true", help="WikiText-2 perplexity (seqlen 2048) after pruning")
    parser.add_argument("--ppl-limit-chunks", type=int, default=None, help="evaluate only the first N chunks")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights (default: %(default)s)")
    parser.add_argument("--mesh", default=None, help="e.g. 'fsdp=-1' or 'data=2,fsdp=4' (default: one device)")
    add_compile_cache_flag(parser)
    add_dataclass_flags(parser, PruneConfig)
    add_dataclass_flags(parser, CalibrationConfig)
    return parser.parse_args(argv)


@script  # a user's mistake: one 'error:' line and exit code 2 (lcc_jax.cli.run_main)
def main(argv=None) -> int:
    args = parse_args(argv)
    import jax.numpy as jnp

    import lcc_jax
    from lcc_jax.checkpoint import save_pruned
    from lcc_jax.cli import dataclass_from_flags, use_compile_cache
    from lcc_jax.convert.export import check_writable, save_hf
    from lcc_jax.data.calibration import CalibrationConfig
    from lcc_jax.progress import setup_logging
    from lcc_jax.pruning.api import PruneConfig, prune
    from lcc_jax.pruning.masks import sparsity_report

    prune_config = dataclass_from_flags(PruneConfig, args)  # a bad flag is refused before anything loads
    calibration_config = dataclass_from_flags(CalibrationConfig, args)
    setup_logging()
    use_compile_cache(args)
    check_writable(args.out.absolute(), overwrite=args.overwrite)  # fail before the slow part
    mesh = lcc_jax.make_mesh(args.mesh) if args.mesh else None
    model, tokenizer, _ = lcc_jax.load(args.model, dtype=jnp.bfloat16 if args.dtype == "bf16" else jnp.float32, mesh=mesh)
    tokens = calibration_config.tokens(tokenizer) if prune_config.needs_calibration else None
    result = prune(model, tokens, prune_config, mesh=mesh)
    report = sparsity_report(result.model, pattern=prune_config.sparsity if prune_config.method != "flap" else None)
    meta = {
        "model": args.model,
        "prune": prune_config,
        "calibration": calibration_config,
        "seconds": result.seconds,
        "sparsity_total": report.total,
        "layer_sparsity": result.layer_sparsity,
        "config": result.model.config.to_hf(),
    }
    if args.eval_ppl:
        from lcc_jax.eval.perplexity import perplexity

        ppl = perplexity(result.model, tokenizer, "wikitext2", seqlen=2048, limit_chunks=args.ppl_limit_chunks, mesh=mesh)
        meta["wikitext2_ppl"] = ppl.ppl
    save_pruned(args.out, result.model, tokenizer, result.masks, head_map=result.head_map, meta=meta, overwrite=args.overwrite)
    if args.export_hf:
        save_hf(result.model, tokenizer, args.export_hf, overwrite=args.overwrite)
    print(report.to_markdown())
    print(json.dumps({k: meta[k] for k in ("seconds", "sparsity_total") + (("wikitext2_ppl",) if args.eval_ppl else ())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
