#!/usr/bin/env python
"""Restore a pruned LLM with RestoreLCC, the whole job in one command, resumable from --out.

Stages (each written into --out and skipped when already there): load, dense eval, probing pairs,
dense capture, prune, pruned eval, pruned capture, lost components (SVD), probes, training, fold into
the o_proj bias, restored eval, export (Orbax in out/restored, Hugging Face in out/restored_hf), and
pictures in out/plots/ (head probe scores, lost-component energy per layer, training loss, perplexities).
A different configuration against an existing --out is refused unless --restart.
Data comes from $LCC_DATA_DIR (alpaca_2000/, wikitext-2-raw/), laid out like the project's shared/data.

Examples:
  python scripts/restore.py                                   # SmolLM2-135M, Wanda 50 %, the paper's defaults
  python scripts/restore.py --method sparsegpt --sparsity 2:4 --out out/sgpt24
  python scripts/restore.py --preset recipe --out out/recipe  # every head, lr 5e-3: the ablation's choice
  python scripts/restore.py --preset quick --out out/quick    # the whole job, small: minutes on a CPU
  python scripts/restore.py --method flap --structured 0.2 --out out/flap20
  python scripts/restore.py path/to/llama --pruned out/wanda50 --out out/r    # a model pruned by scripts/prune.py
  python scripts/restore.py --top-k 0.1 --mode bias_only --out out/ablation   # ablations: --random-heads, --mode,
                                                                              # --components, --top-k
  python scripts/restore.py --train-data boolq --train-split validation --num-train 100 --num-probe 100 \\
      --valid-data none --out out/boolq                       # task-specific recovery
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lcc_jax.cli import ArgumentParser, script

# Flags RestoreConfig already has (its batch size and seed are training's); pruning keeps its defaults.
PRUNE_SHARED = ("batch_size",)
CALIBRATION_SHARED = ("seed",)


def parse_args(argv=None):
    from lcc_jax.cli import add_compile_cache_flag, add_dataclass_flags, parse_with_preset
    from lcc_jax.data.calibration import CalibrationConfig
    from lcc_jax.pruning.api import PruneConfig
    from lcc_jax.restore.config import PRESET_FLAGS, RestoreConfig

    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2-135m",
                        help="the dense model: built-in name, Hugging Face folder, .gguf file or hub id "
                             "(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("out/restore"), help="output folder (default: %(default)s)")
    parser.add_argument("--pruned", default=None, help="a pruned checkpoint from scripts/prune.py (skip pruning here)")
    parser.add_argument("--restart", action="store_true", help="discard an existing --out with another configuration")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights (default: %(default)s)")
    parser.add_argument("--mesh", default=None, help="e.g. 'fsdp=-1' or 'data=2,fsdp=4' (default: one device; with several "
                        "processes, all devices on the fsdp axis)")
    parser.add_argument("--no-export-hf", dest="export_hf", action="store_false", help="skip the Hugging Face export")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the pictures in out/plots/")
    add_compile_cache_flag(parser)
    add_dataclass_flags(parser, RestoreConfig)
    add_dataclass_flags(parser, PruneConfig, skip=PRUNE_SHARED)
    add_dataclass_flags(parser, CalibrationConfig, skip=CALIBRATION_SHARED)
    return parse_with_preset(parser, argv, PRESET_FLAGS)


@script  # a user's mistake: one 'error:' line, exit code 2; stopped by SIGINT / SIGTERM: 130 / 143, stages kept
def main(argv=None) -> int:
    args = parse_args(argv)
    import lcc_jax
    from lcc_jax import estimate
    from lcc_jax.cli import dataclass_from_flags, use_compile_cache
    from lcc_jax.data.calibration import CalibrationConfig
    from lcc_jax.progress import setup_logging
    from lcc_jax.pruning.api import PruneConfig
    from lcc_jax.restore.config import RestoreConfig
    from lcc_jax.restore.pipeline import Job, run

    prune_overrides = {"sparsity": None} if args.method == "flap" else {}
    configs = dict(  # a bad flag is refused here, before anything is logged or loaded
        restore=dataclass_from_flags(RestoreConfig, args),
        prune=dataclass_from_flags(PruneConfig, args, skip=PRUNE_SHARED, **prune_overrides),
        calibration=dataclass_from_flags(CalibrationConfig, args, skip=CALIBRATION_SHARED),
    )
    setup_logging()
    lcc_jax.distributed.initialize()
    use_compile_cache(args)
    job = Job(
        model=args.model,
        out=args.out,
        **configs,
        pruned=args.pruned,
        dtype=args.dtype,
        mesh=lcc_jax.make_mesh(args.mesh) if args.mesh else None,
        export_hf=args.export_hf,
    )
    plan = estimate.follow_restore_job(job, plots=args.plots, restart=args.restart)  # logged; a warning if long on CPU
    with estimate.reported_if_stopped(plan, args.out if lcc_jax.distributed.is_primary() else None):
        summary = run(job, restart=args.restart)
    if not lcc_jax.distributed.is_primary():
        estimate.report(plan)
        return 0
    rows = [("dense", summary["ppl_dense"]), (f"pruned ({summary['pruning']})", summary["ppl_pruned"]),
            (f"RestoreLCC ({summary['heads']} heads, {summary['trainable_params']} params)", summary["ppl_restored"])]
    print("| model | WikiText-2 ppl |\n|---|---|")
    for name, ppl in rows:
        print(f"| {name} | {ppl:.3f} |")
    print("stage seconds:", json.dumps(summary["stage_seconds"]))
    if args.plots:
        write_plots(args.out)
    estimate.report(plan, args.out)  # estimated against measured seconds, also in out/eta.json
    return 0


def write_plots(out: Path) -> None:
    """The run's pictures into out/plots/; a failing picture only warns, the results are already saved."""
    try:
        from lcc_jax.benchmark.plots import plot_restore_run

        paths = plot_restore_run(out)
    except Exception as e:  # noqa: BLE001 - e.g. no matplotlib, or a folder from an older version
        logging.getLogger("lcc_jax.restore").warning("no plots written (%s: %s); the results above are saved",
                                                     type(e).__name__, e)
        return
    print("plots:", ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    sys.exit(main())
