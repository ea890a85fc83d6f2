"""Whether the ablation's recipe may become the default: the member with the lowest Alpaca validation loss,
against every sparsity-keeping rival, on perplexity and the zero-shot mean, with paired-bootstrap intervals.

The rule (issue 14): the recipe becomes the default only if, on every model studied, it beats LoFiT, masked
LoRA and bias-only on both perplexity and the 7-task mean with intervals that exclude zero, and its exported
model keeps the sparsity exactly. Rivals come from the ablation folder (its reference members) and, where
given, from a recovery benchmark folder run from the same pruned checkpoint (masked LoRA, LoFiT's reference
setting). Differences use `benchmark.table.paired_differences` on the seeds both sides have.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lcc_jax.benchmark.cells import load_rows as recovery_rows
from lcc_jax.benchmark.cells import pruned_ppl, same_prune, setting_slug
from lcc_jax.benchmark.table import METHOD_LABELS, delta_cell, paired_differences
from lcc_jax.study.members import PAPER, REFERENCES
from lcc_jax.study.table import REFERENCE_NAMES
from lcc_jax.study.table import load_rows as ablation_rows

ABLATION_RIVALS = REFERENCES  # the paper's setting, LoFiT budget-matched, bias-only
RECOVERY_RIVALS = ("masked_lora", "lofit_reference", "lofit", "bias_only")  # sparsity-keeping methods only
REQUIRED = ("LoFiT", "masked LoRA", "bias-only")  # the rule's rivals: each must be beaten by some measured row


def chosen_recipe(ablation_out: Path, setting: str) -> str:
    """The member with the lowest Alpaca validation loss (the first of finalists.json's order)."""
    chosen = Path(ablation_out) / setting_slug(setting) / "ablation" / "finalists.json"
    if not chosen.exists():
        raise FileNotFoundError(f"{chosen} is missing: run scripts/ablate.py on {setting} first.")
    return json.loads(chosen.read_text())["by_valid_loss"][0]


def recipe_verdict(ablation_out: Path, setting: str, recovery_out: Path | None = None,
                   recipe: str | None = None) -> dict[str, Any]:
    """{"recipe", "setting", "rivals": [{name, kind, seeds, ppl, mean_acc, beats}], "missing", "sparse",
    "default_worthy"} for one setting. `recipe`: the member judged (default: the one chosen on validation loss,
    `chosen_recipe`); a member the ablation did not score has no rivals measured and is not default-worthy."""
    recipe = recipe or chosen_recipe(ablation_out, setting)
    scored = [r for r in ablation_rows(ablation_out).get(setting, []) if r.get("zeroshot")]
    ours = [r for r in scored if r["member"] == recipe]
    candidates = [(REFERENCE_NAMES.get(name, name), "ablation", [r for r in scored if r["member"] == name])
                  for name in ABLATION_RIVALS if name != recipe]
    mismatch = _other_prune(ablation_out, recovery_out, setting) if recovery_out is not None else None
    if recovery_out is not None and mismatch is None:
        cells = recovery_rows(recovery_out, [setting])
        candidates += [(METHOD_LABELS[method], "recovery", [r for r in cells if r["method"] == method])
                       for method in RECOVERY_RIVALS]
    rivals = [_compare(name, kind, ours, rows) for name, kind, rows in candidates if rows]
    measured = [r for r in rivals if r["seeds"]]
    missing = [need for need in REQUIRED if not any(need in r["name"] for r in measured)]
    sparse = bool(ours) and all(r.get("sparsity_after_export") == r.get("sparsity_target") for r in ours)
    return {"recipe": recipe, "paper": PAPER, "setting": setting, "recipe_seeds": sorted(r["seed"] for r in ours),
            "rivals": rivals, "missing": missing, "sparse": sparse, "recovery_left_out": mismatch,
            "default_worthy": bool(measured) and not missing and sparse and all(r["beats"] for r in measured)}


def markdown(verdicts: Sequence[dict]) -> str:
    """One table row per (setting, rival): recipe minus rival, ppl and mean accuracy (points), and the verdict."""
    lines = ["| setting | recipe | rival | seeds | Δ ppl | Δ mean acc | beaten |", "|---|---|---|---|---|---|---|"]
    for v in verdicts:
        for r in v["rivals"]:
            lines.append(f"| {v['setting']} | `{v['recipe']}` | {r['name']} ({r['kind']}) | "
                         f"{','.join(map(str, r['seeds'])) or '–'} | {delta_cell(r['ppl'], lower_wins=True)} | "
                         f"{delta_cell(r['mean_acc'], scale=100)} | {'yes' if r['beats'] else 'no'} |")
    lines.append("")
    for v in verdicts:
        lines.append(f"- {v['setting']}: `{v['recipe']}` {'may' if v['default_worthy'] else 'may not'} become the "
                     f"default ({reasons(v)}).")
    return "\n".join(lines) + "\n"


def _other_prune(ablation_out: Path, recovery_out: Path, setting: str) -> str | None:
    """Why the recovery folder's rows cannot be paired with the ablation's (their pruned models' perplexities
    differ by more than `benchmark.cells.SAME_PRUNE_TOLERANCE`: another prune, e.g. SparseGPT's near-ties flipped on another GPU),
    or None when they can."""
    ours, theirs = pruned_ppl(ablation_out, setting), pruned_ppl(recovery_out, setting)
    if ours is None or theirs is None or same_prune(theirs, ours):
        return None
    return (f"{recovery_out} pruned another checkpoint for {setting} (pruned ppl {theirs:.3f}, the ablation's "
            f"{ours:.3f}): its rows are left out")


def reasons(verdict: dict) -> str:
    """Why a verdict is what it is: the rivals not measured or not beaten, lost sparsity; or that it wins."""
    if not verdict["recipe_seeds"]:
        return f"`{verdict['recipe']}` was not trained in this ablation"
    unbeaten = list(dict.fromkeys(r["name"] for r in verdict["rivals"] if r["seeds"] and not r["beats"]))
    parts = ([f"not measured: {', '.join(verdict['missing'])}"] if verdict["missing"] else []) + \
            ([f"not beaten: {', '.join(unbeaten)}"] if unbeaten else []) + \
            ([] if verdict["sparse"] else ["sparsity not kept"]) + \
            ([verdict["recovery_left_out"]] if verdict.get("recovery_left_out") else [])
    return "; ".join(parts) or "beats every measured rival on both"


def _compare(name: str, kind: str, ours: list[dict], theirs: list[dict]) -> dict[str, Any]:
    seeds = sorted({r["seed"] for r in ours} & {r["seed"] for r in theirs})
    a = sorted((r for r in ours if r["seed"] in seeds), key=lambda r: r["seed"])
    b = sorted((r for r in theirs if r["seed"] in seeds), key=lambda r: r["seed"])
    diff = paired_differences(a, b) if seeds else {"ppl": None, "mean_acc": None}
    beats = (diff["ppl"] is not None and diff["ppl"]["high"] < 0
             and diff["mean_acc"] is not None and diff["mean_acc"]["low"] > 0)
    return {"name": name, "kind": kind, "seeds": seeds, **diff, "beats": beats}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lcc_jax.study.verdict ABLATION_OUT [--recovery RECOVERY_OUT] [--settings ...]`: print the
    verdict table (and write verdict.md/json into ABLATION_OUT)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ablation", type=Path, help="a scripts/ablate.py --out folder")
    parser.add_argument("--recovery", type=Path, default=None,
                        help="a scripts/benchmark_recovery.py --out folder run from the same pruned checkpoints")
    parser.add_argument("--settings", default=None, help="comma-separated (default: every setting ablated)")
    args = parser.parse_args(argv)
    if not args.ablation.is_dir():
        parser.error(f"{args.ablation} is not a folder: pass the folder scripts/ablate.py --out wrote.")
    if args.recovery is not None and not args.recovery.is_dir():
        parser.error(f"{args.recovery} is not a folder: pass the folder scripts/benchmark_recovery.py --out wrote, "
                     "or leave --recovery out.")
    settings = args.settings.split(",") if args.settings else list(ablation_rows(args.ablation))
    if not settings:
        parser.error(f"{args.ablation} holds no ablated setting: pass the folder scripts/ablate.py --out wrote.")
    verdicts = [recipe_verdict(args.ablation, s, args.recovery) for s in settings]
    text = markdown(verdicts)
    (args.ablation / "verdict.md").write_text(text)
    (args.ablation / "verdict.json").write_text(json.dumps(verdicts, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
