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

from lcc_jax.benchmark.cells import setting_slug
from lcc_jax.benchmark.table import METHOD_LABELS, delta_cell, paired_differences
from lcc_jax.study.members import PAPER, REFERENCES
from lcc_jax.study.table import REFERENCE_NAMES

ABLATION_RIVALS = REFERENCES  # the paper's setting, LoFiT budget-matched, bias-only
RECOVERY_RIVALS = ("masked_lora", "lofit_reference", "lofit", "bias_only")  # sparsity-keeping methods only
REQUIRED = ("LoFiT", "masked LoRA", "bias-only")  # the rule's rivals: each must be beaten by some measured row


def recipe_verdict(ablation_out: Path, setting: str, recovery_out: Path | None = None) -> dict[str, Any]:
    """{"recipe", "setting", "rivals": [{name, kind, seeds, ppl, mean_acc, beats}], "missing", "sparse",
    "default_worthy"} for one setting. `recipe` is the first of finalists.json's validation-loss order."""
    folder = Path(ablation_out) / setting_slug(setting) / "ablation"
    chosen = folder / "finalists.json"
    if not chosen.exists():
        raise FileNotFoundError(f"{chosen} is missing: run scripts/ablate.py on {setting} first.")
    recipe = json.loads(chosen.read_text())["by_valid_loss"][0]
    ablation = _ablation_rows(folder)
    ours = [r for r in ablation.get(recipe, []) if r.get("zeroshot")]
    rivals: list[dict[str, Any]] = []
    for name in ABLATION_RIVALS:
        if name != recipe and ablation.get(name):
            rivals.append(_compare(REFERENCE_NAMES.get(name, name), "ablation", ours,
                                   [r for r in ablation[name] if r.get("zeroshot")]))
    if recovery_out is not None:
        cells = Path(recovery_out) / setting_slug(setting)
        for method in RECOVERY_RIVALS:
            rows = [json.loads(p.read_text()) for p in sorted(cells.glob(f"seed*/{method}.json"))]
            if rows:
                rivals.append(_compare(METHOD_LABELS[method], "recovery", ours, rows))
    measured = [r for r in rivals if r["seeds"]]
    missing = [need for need in REQUIRED if not any(need in r["name"] for r in measured)]
    sparse = bool(ours) and all(r.get("sparsity_after_export") == r.get("sparsity_target") for r in ours)
    return {"recipe": recipe, "paper": PAPER, "setting": setting, "recipe_seeds": sorted(r["seed"] for r in ours),
            "rivals": rivals, "missing": missing, "sparse": sparse,
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
        why = ("beats every measured rival on both" if v["default_worthy"] else
               "; ".join(filter(None, [
                   f"not measured: {', '.join(v['missing'])}" if v["missing"] else "",
                   "not beaten: " + ", ".join(r["name"] for r in v["rivals"] if r["seeds"] and not r["beats"])
                   if any(r["seeds"] and not r["beats"] for r in v["rivals"]) else "",
                   "" if v["sparse"] else "sparsity not kept"])))
        lines.append(f"- {v['setting']}: `{v['recipe']}` {'may' if v['default_worthy'] else 'may not'} become the "
                     f"default ({why}).")
    return "\n".join(lines) + "\n"


def _ablation_rows(folder: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("seed*/*.json")):
        row = json.loads(path.read_text())
        rows.setdefault(row["member"], []).append(row)
    return rows


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
    settings = (args.settings.split(",") if args.settings else
                [json.loads(p.read_text())["setting"] for p in sorted(args.ablation.glob("*/pruned.json"))])
    verdicts = [recipe_verdict(args.ablation, s, args.recovery) for s in settings]
    text = markdown(verdicts)
    (args.ablation / "verdict.md").write_text(text)
    (args.ablation / "verdict.json").write_text(json.dumps(verdicts, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
