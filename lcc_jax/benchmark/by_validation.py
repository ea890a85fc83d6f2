"""Choose between recovery runs of one method on the Alpaca validation loss, never on the test sets.

Each folder is a `scripts/benchmark_recovery.py --out` of the same setting(s) and seeds that differ in a training
choice (e.g. `--lora-learning-rate`: masked LoRA's rate was never tuned, while RestoreLCC's recipe was chosen on
this loss). Per (setting, folder): the rate(s) from its run.json, the seeds, the mean ± std validation loss of
`method`'s cells, and (for the record, not for the choice) their WikiText-2 perplexity. The choice per setting is
the folder with the lowest mean validation loss over the seeds every folder ran. With `--rivals FOLDER` (other
methods run from the same pruned checkpoint) the chosen folder's cells are then set against each rival's on their
shared seeds: the validation-loss difference, and perplexity and 7-task-mean differences with paired-bootstrap
intervals (`benchmark.table.paired_differences`), as the recipe's verdict reports them.

    python -m lcc_jax.benchmark.by_validation --method masked_lora OUT_1e-4 OUT_3e-4 OUT_1e-3 --rivals RIVALS \
        --out choice.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from lcc_jax.benchmark.cells import load_rows, pruned_ppl, same_prune
from lcc_jax.benchmark.config import RecoveryError
from lcc_jax.benchmark.table import METHOD_LABELS, delta_cell, paired_differences

RATE_KEYS = ("lora_learning_rate", "lofit_select_learning_rate", "lofit_bias_learning_rate")


def cells(folder: Path, method: str) -> dict[str, dict[int, dict]]:
    """{setting: {seed: cell}} of `method` in one recovery folder (`cells.load_rows`)."""
    found: dict[str, dict[int, dict]] = {}
    for cell in load_rows(folder):
        if cell.get("method") == method:
            found.setdefault(cell["setting"], {})[int(cell["seed"])] = cell
    return found


def compare(folders: Sequence[Path], method: str) -> list[dict]:
    """One entry per setting: each folder's figures on the shared seeds, and the folder chosen."""
    runs = {Path(f): cells(Path(f), method) for f in folders}
    settings = sorted({s for by_setting in runs.values() for s in by_setting})
    if not settings:
        raise RecoveryError(f"no {method} cells in {', '.join(map(str, folders))}: run scripts/benchmark_recovery.py "
                            f"--methods {method} into each folder first.")
    out = []
    for setting in settings:
        seeds = set.intersection(*(set(r.get(setting, {})) for r in runs.values()))
        if not seeds:
            raise RecoveryError(f"{setting}: no seed of {method} is in every folder; run the same --seeds in each.")
        rows = []
        for folder, by_setting in runs.items():
            chosen = [by_setting[setting][s] for s in sorted(seeds)]
            losses = [c.get("valid_loss") for c in chosen]
            if any(v is None for v in losses):
                raise RecoveryError(f"{folder}: {setting} {method} cells without a validation loss (made before cells "
                                    "recorded it, or with --valid-data none); run them again to choose on it.")
            rows.append({"folder": str(folder), "rates": _rates(folder), "seeds": sorted(seeds),
                         "valid_loss": statistics.mean(losses),
                         "valid_loss_std": statistics.stdev(losses) if len(losses) > 1 else None,
                         "ppl": statistics.mean(c["ppl"] for c in chosen)})
        best = min(rows, key=lambda r: r["valid_loss"])
        out.append({"setting": setting, "method": method, "rows": rows, "chosen": best["folder"]})
    return out


def against_rivals(choice: dict, rivals: Path) -> list[dict]:
    """The chosen folder's `choice["method"]` cells minus each other method's cells in `rivals`, on their shared
    seeds: {"rival", "seeds", "valid_loss" (mean paired difference), "ppl", "mean_acc" (interval dicts)}."""
    setting, chosen = choice["setting"], Path(choice["chosen"])
    ours_ppl, theirs_ppl = pruned_ppl(chosen, setting), pruned_ppl(rivals, setting)
    if ours_ppl is None or theirs_ppl is None:
        raise RecoveryError(f"{setting}: {chosen if ours_ppl is None else rivals} has no pruned.json, so whether both "
                            "started from one checkpoint is unknown; pass folders benchmark_recovery.py wrote.")
    if not same_prune(theirs_ppl, ours_ppl):
        raise RecoveryError(f"{setting}: {rivals} started from another prune (pruned ppl {theirs_ppl:.3f}, the chosen "
                            f"folder's {ours_ppl:.3f}); run the rivals with --base on the chosen folder's prune.")
    ours = cells(chosen, choice["method"]).get(setting, {})
    by_method: dict[str, dict[int, dict]] = {}
    for cell in load_rows(rivals, [setting]):
        if cell.get("method") not in (choice["method"], "pruned", "dense"):
            by_method.setdefault(cell["method"], {})[int(cell["seed"])] = cell
    out = []
    for cell_method, theirs in sorted(by_method.items()):
        seeds = sorted(set(ours) & set(theirs))
        if not seeds:
            continue
        a, b = [ours[s] for s in seeds], [theirs[s] for s in seeds]
        losses = [x.get("valid_loss") for x in a + b]
        out.append({"rival": cell_method, "seeds": seeds, **paired_differences(a, b),
                    "valid_loss": None if None in losses else
                    statistics.mean(x["valid_loss"] - y["valid_loss"] for x, y in zip(a, b, strict=True))})
    return out


def rivals_markdown(choice: dict, rivals: Sequence[dict]) -> str:
    label = METHOD_LABELS.get(choice["method"], choice["method"])
    lines = [f"{choice['setting']}: {label} from `{choice['chosen']}` minus each rival (seed-averaged; 95 % paired "
             "bootstrap; win / loss where the interval excludes zero)", "",
             "| rival | seeds | Δ Alpaca valid loss | Δ WikiText-2 ppl | Δ mean acc (points) |", "|---|---|---:|---:|---:|"]
    for r in rivals:
        loss = "–" if r["valid_loss"] is None else f"{r['valid_loss']:+.4f}"
        lines.append(f"| {METHOD_LABELS.get(r['rival'], r['rival'])} | {','.join(map(str, r['seeds']))} | {loss} "
                     f"| {delta_cell(r['ppl'], lower_wins=True)} | {delta_cell(r['mean_acc'], scale=100)} |")
    return "\n".join(lines)


def _rates(folder: Path) -> dict:
    try:
        config = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: config[k] for k in RATE_KEYS if k in config}


def markdown(choices: Sequence[dict]) -> str:
    lines = ["| setting | folder | rates | seeds | Alpaca valid loss | WikiText-2 ppl (not used) | chosen |",
             "|---|---|---|---|---:|---:|---|"]
    for choice in choices:
        for r in choice["rows"]:
            std = "" if r["valid_loss_std"] is None else f" ± {r['valid_loss_std']:.4f}"
            rates = ", ".join(f"{k.removesuffix('_learning_rate')} {v:g}" for k, v in r["rates"].items())
            chosen = "**yes**" if r["folder"] == choice["chosen"] else ""
            lines.append(f"| {choice['setting']} | {r['folder']} | {rates or '–'} | {','.join(map(str, r['seeds']))} "
                         f"| {r['valid_loss']:.4f}{std} | {r['ppl']:.2f} | {chosen} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--method", default="masked_lora")
    parser.add_argument("--rivals", type=Path, default=None,
                        help="a benchmark_recovery.py --out folder of other methods from the same prune: set the "
                             "chosen folder against each")
    parser.add_argument("--out", type=Path, default=None, help="also write the comparison as JSON")
    args = parser.parse_args(argv)
    if args.rivals is not None and not args.rivals.is_dir():
        parser.error(f"--rivals {args.rivals} is not a folder: pass the folder benchmark_recovery.py --out wrote.")
    try:
        choices = compare(args.folders, args.method)
        if args.rivals is not None:
            for choice in choices:
                choice["against_rivals"] = against_rivals(choice, args.rivals)
    except RecoveryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown(choices))
    for choice in choices:
        if "against_rivals" in choice:
            print("\n" + rivals_markdown(choice, choice["against_rivals"]))
    if args.out is not None:
        args.out.write_text(json.dumps(choices, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
