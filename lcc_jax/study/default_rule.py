"""Whether one RestoreLCC configuration may become lcc_jax's default, judged on every study at once.

Each study (a model's `scripts/ablate.py` folder, with the recovery benchmark run from the same pruned checkpoints)
chooses its recipe on Alpaca validation loss, setting by setting (`verdict.chosen_recipe`). The rule (issue 14)
asks more of a default than a win where it was chosen: one configuration must beat LoFiT, masked LoRA and
bias-only on perplexity and on the 7-task mean, intervals excluding zero, and keep the sparsity, in every
(model, setting) studied. So every recipe any study chose is judged in every study (`verdict.recipe_verdict`);
one that a study never trained counts as not measured there.

    python -m lcc_jax.study.default_rule \\
        --study smollm2 results/smollm2/ablation results/smollm2/recovery_3seed results/smollm2/recovery_sparsegpt24 \\
        --study qwen results/qwen2.5-coder-1.5b/ablation results/qwen2.5-coder-1.5b/recovery
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lcc_jax.benchmark.cells import setting_slug
from lcc_jax.study.table import load_rows as ablation_rows
from lcc_jax.study.verdict import chosen_recipe, reasons, recipe_verdict


@dataclasses.dataclass(frozen=True)
class Study:
    """One model's ablation folder and, where run, its recovery benchmark folders (masked LoRA, LoFiT reference);
    each setting is paired with the first recovery folder that holds it."""

    name: str
    ablation: Path
    recovery: tuple[Path, ...] = ()

    def recovery_for(self, setting: str) -> Path | None:
        return next((r for r in self.recovery if (Path(r) / setting_slug(setting) / "pruned.json").exists()), None)


def decide(studies: Sequence[Study], settings: Sequence[str] | None = None) -> dict[str, Any]:
    """{"candidates": [{recipe, chosen_in, cells: [{study, setting, verdict}], default_worthy}], "default"}:
    every recipe a study chose, judged in every (study, setting); "default" is a candidate that wins everywhere
    (the one chosen in the most places), or None."""
    cells = [(study, setting) for study in studies for setting in ablation_rows(study.ablation)
             if settings is None or setting in settings]
    if not cells:
        raise ValueError("no ablated setting in the studies given: pass the folders scripts/ablate.py --out wrote.")
    chosen = {(study.name, setting): chosen_recipe(study.ablation, setting) for study, setting in cells}
    candidates = []
    for recipe in dict.fromkeys(chosen.values()):
        judged = [{"study": study.name, "setting": setting,
                   "verdict": recipe_verdict(study.ablation, setting, study.recovery_for(setting), recipe=recipe)}
                  for study, setting in cells]
        candidates.append({"recipe": recipe, "chosen_in": [f"{s} {t}" for (s, t), r in chosen.items() if r == recipe],
                           "cells": judged,
                           "default_worthy": all(c["verdict"]["default_worthy"] for c in judged)})
    # where more than one wins everywhere, the one chosen in the most places (never a pick by test scores)
    default = next((c["recipe"] for c in sorted(candidates, key=lambda c: -len(c["chosen_in"]))
                    if c["default_worthy"]), None)
    return {"candidates": candidates, "default": default}


def markdown(decision: dict) -> str:
    """One table per candidate recipe (a row per study and setting), then the decision."""
    lines = []
    for c in decision["candidates"]:
        lines += [f"### `{c['recipe']}` (chosen on validation loss in: {', '.join(c['chosen_in'])})", "",
                  "| study | setting | seeds | wins here | why not |", "|---|---|---|---|---|"]
        for cell in c["cells"]:
            v = cell["verdict"]
            lines.append(f"| {cell['study']} | {cell['setting']} | {','.join(map(str, v['recipe_seeds'])) or '–'} | "
                         f"{'yes' if v['default_worthy'] else 'no'} | "
                         f"{'' if v['default_worthy'] else reasons(v)} |")
        lines.append("")
    default = decision["default"]
    lines.append(f"Default: `{default}` wins in every study and setting." if default else
                 "Default: none of the candidates wins in every study and setting, so the paper's setting stays.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", nargs="+", action="append", required=True, metavar="NAME ABLATION [RECOVERY ...]",
                        help="a study's name, its scripts/ablate.py --out folder and its scripts/benchmark_recovery.py "
                             "--out folders, if any (repeat for each model)")
    parser.add_argument("--settings", default=None, help="comma-separated (default: every setting ablated)")
    parser.add_argument("--out", type=Path, default=None, help="also write the decision here (.md, and .json beside)")
    args = parser.parse_args(argv)
    studies = []
    for given in args.study:
        if len(given) < 2:
            parser.error(f"--study {' '.join(given)}: give NAME ABLATION [RECOVERY ...].")
        name, folders = given[0], [Path(p) for p in given[1:]]
        missing = [str(p) for p in folders if not p.is_dir()]
        if missing:
            parser.error(f"--study {name}: {', '.join(missing)} is not a folder: pass the folders scripts/ablate.py "
                         "and scripts/benchmark_recovery.py wrote with --out.")
        studies.append(Study(name, folders[0], tuple(folders[1:])))
    try:
        decision = decide(studies, args.settings.split(",") if args.settings else None)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    text = markdown(decision)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(decision, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
