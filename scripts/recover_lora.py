#!/usr/bin/env python
"""Recover a pruned model with masked LoRA: LoRA on every projection (r 8), its merged update masked by the pruning
mask, so every pruned weight stays zero. In every run of this project's recovery benchmark and ablation it recovered
more perplexity than RestoreLCC, LoFiT and bias-only (README, Results); scripts/restore.py runs RestoreLCC.

Reads a scripts/prune.py folder, trains on RestoreLCC's data and budget (the training flags of scripts/restore.py;
lr 1e-4 as in the Wanda and DoRA papers), merges the adapter, checks which pruned weights are still zero, and writes
the model (Orbax: lcc_jax.load reads it) with summary.json to --out; --export-hf also writes a Hugging Face folder.
--out must not exist (or be empty) unless --overwrite, and it is written only when everything before succeeded.

Examples:
  python scripts/prune.py --out out/wanda50 && python scripts/recover_lora.py out/wanda50 --out out/wanda50_lora
  python scripts/recover_lora.py out/sgpt24 --out out/sgpt24_lora --export-hf out/sgpt24_lora_hf --eval-ppl
  python scripts/recover_lora.py out/wanda50 --out out/quick --num-train 48 --num-valid 16 --max-length 128 --epochs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from lcc_jax.cli import ArgumentParser, script

# RestoreConfig fields that only RestoreLCC's probing, components and compensation use (the training budget stays)
NOT_TRAINING = ("num_probe", "capture_length", "negatives", "top_k", "components", "mode", "random_heads",
                "spread_heads", "init_std", "learning_rate", "capture_batch_size", "probe_seed")


def parse_args(argv=None):
    from lcc_jax.baselines.lora import PRESETS
    from lcc_jax.baselines.recover import LORA_LEARNING_RATE
    from lcc_jax.cli import add_compile_cache_flag, add_dataclass_flags
    from lcc_jax.restore.config import RestoreConfig

    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pruned", type=Path, help="a scripts/prune.py output folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--export-hf", type=Path, default=None, metavar="DIR", help="also write a Hugging Face folder")
    parser.add_argument("--adapter", choices=tuple(PRESETS), default="masked",
                        help="masked (keeps the sparsity); wanda (q, v), all or dora merge dense updates and revive "
                        "pruned weights, for comparison (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=LORA_LEARNING_RATE, help="(default: %(default)s)")
    parser.add_argument("--eval-ppl", action="store_true",
                        help="WikiText-2 perplexity of the pruned and the recovered model (--eval-seqlen, "
                        "--eval-limit-chunks)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights (default: %(default)s)")
    parser.add_argument("--mesh", default=None, help="e.g. 'fsdp=-1' (default: one device)")
    add_compile_cache_flag(parser)
    add_dataclass_flags(parser, RestoreConfig, skip=NOT_TRAINING)
    return parser.parse_args(argv)


@script  # a user's mistake: one 'error:' line and exit code 2 (lcc_jax.cli.run_main)
def main(argv=None) -> int:
    args = parse_args(argv)
    import jax.numpy as jnp

    import lcc_jax
    from lcc_jax.checkpoint import load_pruned
    from lcc_jax.cli import dataclass_from_flags, use_compile_cache
    from lcc_jax.convert.export import check_writable, save_hf, save_orbax
    from lcc_jax.eval.perplexity import perplexity
    from lcc_jax.progress import setup_logging
    from lcc_jax.restore.config import RestoreConfig

    config = dataclass_from_flags(RestoreConfig, args, skip=NOT_TRAINING,
                                  num_probe=RestoreConfig.unprobed_num_probe(args.num_train))  # nothing is probed
    setup_logging()
    use_compile_cache(args)
    check_writable(args.out.absolute(), overwrite=args.overwrite)  # fail before the slow part
    if args.export_hf:
        check_writable(args.export_hf.absolute(), overwrite=args.overwrite)
    mesh = lcc_jax.make_mesh(args.mesh) if args.mesh else None
    checkpoint = load_pruned(args.pruned, dtype=jnp.bfloat16 if args.dtype == "bf16" else jnp.float32, mesh=mesh)

    def ppl(model) -> float:
        return perplexity(model, checkpoint.tokenizer, "wikitext2", seqlen=config.eval_seqlen,
                          limit_chunks=config.eval_limit_chunks, mesh=mesh).ppl

    summary: dict = {"pruned": str(args.pruned), "adapter": args.adapter, "learning_rate": args.learning_rate}
    if args.eval_ppl:
        summary["wikitext2_ppl_pruned"] = ppl(checkpoint.model)
    recovery = lcc_jax.recover_lora(checkpoint, checkpoint.tokenizer, config, adapter=args.adapter,
                                    learning_rate=args.learning_rate, mesh=mesh)
    sparsity = recovery.sparsity
    summary.update(
        trainable_params=recovery.trainable_params, train_seconds=recovery.seconds,
        final_loss=recovery.history["loss"][-1], valid_loss=recovery.history.get("valid_loss", []),
        sparsity={"target": sparsity.target, "after_merge": sparsity.surviving, "revived_weights": sparsity.revived},
        budget={k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_TRAINING},
    )
    if args.eval_ppl:
        summary["wikitext2_ppl_recovered"] = ppl(recovery.model)
    save_orbax(recovery.model, checkpoint.tokenizer, args.out, overwrite=args.overwrite)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.export_hf:
        save_hf(recovery.model, checkpoint.tokenizer, args.export_hf, overwrite=args.overwrite)
    print(json.dumps({k: summary[k] for k in summary if k not in ("budget", "valid_loss")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
