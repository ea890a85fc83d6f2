#!/usr/bin/env python
"""The recovery table: dense, pruned, LoRA, DoRA, LoFiT and RestoreLCC on several pruning settings.

Every method trains on the same samples, epochs and batch as RestoreLCC (the RestoreConfig flags)
from the same pruned checkpoint; each is scored as exported (adapters merged, vectors folded):
WikiText-2 perplexity, the zero-shot tasks, and the sparsity that survives the merge. Three seeds by
default: mean ± std over them, and each method's difference from the pruned model and from RestoreLCC
with a 95 % paired-bootstrap interval over documents ("win" only where it excludes zero). Results go to
--out: one JSON per cell (the run resumes from them), results.json, table.md and bar charts.
Methods: lora (Wanda's q,v r=8 recipe), dora (all projections), masked_lora, lofit, bias_only, restorelcc.

Examples:
  python scripts/benchmark_recovery.py                                # SmolLM2-135M, Wanda 50 %, SparseGPT 2:4,
                                                                      # FLAP 20 %; full WikiText-2 and zero-shot
  python scripts/benchmark_recovery.py --settings wanda:0.5 --methods lora,restorelcc --seeds 0  # one seed
  python scripts/benchmark_recovery.py --limit 200 --tasks suite      # quicker: 200 documents per task
  python scripts/benchmark_recovery.py --preset quick --out out/recovery_quick  # small: one setting, one seed
  python scripts/benchmark_recovery.py --prune-only --out out/base   # prune and score once, then one part per GPU:
  python scripts/benchmark_recovery.py --settings wanda:0.5 --base out/base --out out/p1   # e.g. on GPU 1
  python scripts/benchmark_recovery.py --merge-from out/p1,out/p2,out/p3 --out out/recovery   # the whole table
  python scripts/benchmark_recovery.py --num-train 200 --num-probe 100 --epochs 1 --eval-limit-chunks 4 \\
      --tasks boolq,rte --limit 50 --nsamples 16 --out out/recovery_small    # a scaled-down CPU run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lcc_jax.cli import ArgumentParser, script

CALIBRATION_SHARED = ("seed",)


def parse_args(argv=None):
    from lcc_jax.benchmark import DEFAULT_METHODS, DEFAULT_SETTINGS, METHODS, RecoveryConfig
    from lcc_jax.cli import add_compile_cache_flag, add_dataclass_flags, parse_with_preset
    from lcc_jax.data.calibration import CalibrationConfig
    from lcc_jax.restore.config import PRESET_FLAGS, RestoreConfig

    defaults = RecoveryConfig()
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2-135m",
                        help="the dense model: built-in name, Hugging Face folder, .gguf file or hub id (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("out/recovery"), help="output folder (default: %(default)s)")
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                        help="pruning settings, comma-separated: wanda:0.5, sparsegpt:2:4, magnitude:4:8, flap:0.2 "
                        "(default: %(default)s)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"recovery methods, comma-separated, from {', '.join(METHODS)} (default: %(default)s)")
    parser.add_argument("--seeds", default=",".join(map(str, defaults.seeds)),
                        help="training seeds, comma-separated; several give mean ± std, and the paired intervals are "
                        "computed on the seed-averaged outcome of each document (default: %(default)s)")
    parser.add_argument("--tasks", default=defaults.tasks,
                        help="zero-shot tasks: 'suite', 'all' (+ PIQA), names, or 'none' (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="zero-shot: first N documents per task (default: all)")
    parser.add_argument("--zeroshot-batch-size", type=int, default=defaults.zeroshot_batch_size)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=defaults.dtype, help="weights (default: %(default)s)")
    parser.add_argument("--mesh", default=None, help="e.g. 'fsdp=-1' (default: one device)")
    parser.add_argument("--prune-batch-size", type=int, default=defaults.prune_batch_size)
    parser.add_argument("--lora-learning-rate", type=float, default=defaults.lora_learning_rate,
                        help="LoRA, DoRA and masked LoRA (default: %(default)s)")
    parser.add_argument("--lofit-select-learning-rate", type=float, default=defaults.lofit_select_learning_rate)
    parser.add_argument("--lofit-bias-learning-rate", type=float, default=defaults.lofit_bias_learning_rate)
    parser.add_argument("--restart", action="store_true", help="discard an --out folder made with another configuration")
    parser.add_argument("--base", default=None,
                        help="start from these --prune-only folders' pruned checkpoints (comma-separated; hard-linked into "
                        "--out, the first folder that has each): a part of a table split over GPUs or machines, each "
                        "part its own --out")
    parser.add_argument("--merge-from", default=None,
                        help="comma-separated part folders (made from one --base) to gather into --out first; the run "
                        "then finds their cells done and writes the whole table")
    parser.add_argument("--prune-only", action="store_true",
                        help="score the dense model and prune and score every setting, train nothing: a base for a "
                        "table split over several GPUs or machines (each part hard-links SETTING/pruned and "
                        "SETTING/pruned.json from it)")
    add_compile_cache_flag(parser)
    add_dataclass_flags(parser, RestoreConfig)
    add_dataclass_flags(parser, CalibrationConfig, skip=CALIBRATION_SHARED)
    return parse_with_preset(parser, argv, PRESET_FLAGS)


@script  # a user's mistake: one 'error:' line and exit code 2 (lcc_jax.cli.run_main)
def main(argv=None) -> int:
    args = parse_args(argv)
    import lcc_jax
    from lcc_jax import estimate
    from lcc_jax.benchmark import RecoveryConfig, run_recovery
    from lcc_jax.benchmark.cells import setting_slug
    from lcc_jax.benchmark.config import parse_setting
    from lcc_jax.benchmark.parts import link_base, merge_parts
    from lcc_jax.cli import comma_ints, comma_list, dataclass_from_flags, tasks_flag, use_compile_cache
    from lcc_jax.data.calibration import CalibrationConfig
    from lcc_jax.progress import setup_logging
    from lcc_jax.restore.config import RestoreConfig

    setup_logging()
    use_compile_cache(args)
    config = RecoveryConfig(
        settings=comma_list(args.settings),
        methods=comma_list(args.methods),
        seeds=comma_ints(args.seeds, "--seeds"),
        tasks=tasks_flag(args.tasks),
        limit=args.limit,
        zeroshot_batch_size=args.zeroshot_batch_size,
        dtype=args.dtype,
        restore=dataclass_from_flags(RestoreConfig, args),
        calibration=dataclass_from_flags(CalibrationConfig, args, skip=CALIBRATION_SHARED),
        prune_batch_size=args.prune_batch_size,
        lora_learning_rate=args.lora_learning_rate,
        lofit_select_learning_rate=args.lofit_select_learning_rate,
        lofit_bias_learning_rate=args.lofit_bias_learning_rate,
    )
    mesh = lcc_jax.make_mesh(args.mesh) if args.mesh else None
    if args.base is not None:
        link_base([Path(b) for b in comma_list(args.base)], args.out, config.settings)
    if args.merge_from:
        merge_parts([Path(p) for p in comma_list(args.merge_from)], args.out)
    if args.prune_only:
        results = run_recovery(args.model, args.out, config, mesh=mesh, restart=args.restart, prune_only=True)
    else:
        plan = estimate.follow_recovery(args.model, args.out, config, mesh=mesh, slug=setting_slug,  # logged; warns
                                        prune_configs={s: parse_setting(s) for s in config.settings})  # if long
        with estimate.reported_if_stopped(plan, args.out):  # a stopped run keeps its finished cells' seconds
            results = run_recovery(args.model, args.out, config, mesh=mesh, restart=args.restart)
        estimate.report(plan, args.out)  # estimated against measured seconds, also in out/eta.json
    print((args.out / "table.md").read_text())
    for chart in results.get("charts", []):
        print(f"chart: {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
