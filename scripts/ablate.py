#!/usr/bin/env python
"""What limits RestoreLCC: a grid of restorations (head rankings, modes, spans, top-k, learning rates) from
one pruned model per setting, trained side by side, finalists chosen on the Alpaca validation loss.

Members read '<ranking>:<mode>:<top_k>:<lr>' (lcc_jax.study.ablation); every member trains on the
RestoreLCC budget (the RestoreConfig flags). Results go to --out/<setting>/ablation/seed<k>/ (one JSON
per member; a stopped run resumes) and --out/ablation.json; the table is written to --out/ablation.md.

Examples:
  python scripts/ablate.py                                   # SmolLM2-135M, Wanda 50 % and SparseGPT 2:4
  python scripts/ablate.py /path/to/model --settings wanda:0.5 --members probe:full:0.25:1e-3,random:full:0.25:1e-3
  python scripts/ablate.py --num-train 64 --num-probe 32 --num-valid 16 --epochs 1 --eval-limit-chunks 2 \\
      --tasks boolq --limit 20 --nsamples 8 --out out/ablation_small      # a scaled-down CPU run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lcc_jax.cli import ArgumentParser, script

CALIBRATION_SHARED = ("seed",)


def parse_args(argv=None):
    from lcc_jax.cli import add_compile_cache_flag, add_dataclass_flags
    from lcc_jax.data.calibration import CalibrationConfig
    from lcc_jax.restore.config import RestoreConfig
    from lcc_jax.study.ablation import AblationConfig

    d = AblationConfig()
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2-135m", help="the dense model (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("out/ablation"), help="output folder (default: %(default)s)")
    parser.add_argument("--settings", default=",".join(d.settings), help="pruning settings (default: %(default)s)")
    parser.add_argument("--base", default=None,
                        help="benchmark_recovery.py --prune-only folders (comma-separated): start from their pruned "
                        "checkpoints (hard-linked into --out), the same masks as the recovery parts made from them")
    parser.add_argument("--members", default=None, help="comma-separated members (default: the built-in grid)")
    parser.add_argument("--screen-seeds", default=",".join(map(str, d.screen_seeds)))
    parser.add_argument("--final-seeds", default=",".join(map(str, d.final_seeds)))
    parser.add_argument("--finalists", type=int, default=d.finalists)
    parser.add_argument("--members-per-grid", type=int, default=d.members_per_grid)
    parser.add_argument("--tasks", default="suite", help="zero-shot tasks of the finalists, or 'none' (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="zero-shot: first N documents per task (default: all)")
    parser.add_argument("--zeroshot-batch-size", type=int, default=32)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights (default: %(default)s)")
    parser.add_argument("--mesh", default=None, help="e.g. 'data=-1' (default: one device)")
    add_compile_cache_flag(parser)
    add_dataclass_flags(parser, RestoreConfig)
    add_dataclass_flags(parser, CalibrationConfig, skip=CALIBRATION_SHARED)
    return parser.parse_args(argv)


@script  # a user's mistake: one 'error:' line and exit code 2 (lcc_jax.cli.run_main)
def main(argv=None) -> int:
    args = parse_args(argv)
    import lcc_jax
    from lcc_jax.benchmark.config import RecoveryConfig
    from lcc_jax.benchmark.parts import link_base
    from lcc_jax.cli import comma_ints, comma_list, dataclass_from_flags, tasks_flag, use_compile_cache
    from lcc_jax.data.calibration import CalibrationConfig
    from lcc_jax.progress import setup_logging
    from lcc_jax.restore.config import RestoreConfig
    from lcc_jax.study.ablation import AblationConfig, run_ablation
    from lcc_jax.study.table import write_ablation_report

    setup_logging()
    use_compile_cache(args)
    recovery = RecoveryConfig(
        settings=("wanda:0.5",), methods=("restorelcc",), seeds=(0,),
        tasks=tasks_flag(args.tasks), limit=args.limit,
        zeroshot_batch_size=args.zeroshot_batch_size, dtype=args.dtype,
        restore=dataclass_from_flags(RestoreConfig, args),
        calibration=dataclass_from_flags(CalibrationConfig, args, skip=CALIBRATION_SHARED),
    )
    extra = {} if args.members is None else {"members": comma_list(args.members)}
    config = AblationConfig(settings=comma_list(args.settings),
                            screen_seeds=comma_ints(args.screen_seeds, "--screen-seeds"),
                            final_seeds=comma_ints(args.final_seeds, "--final-seeds"),
                            finalists=args.finalists, members_per_grid=args.members_per_grid, recovery=recovery,
                            **extra)
    mesh = lcc_jax.make_mesh(args.mesh) if args.mesh else None
    if args.base is not None:
        link_base([Path(b) for b in comma_list(args.base)], args.out, config.settings)
    results = run_ablation(args.model, args.out, config, mesh=mesh)
    print(write_ablation_report(args.out, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
