"""How far choosing on the Alpaca validation loss can be trusted: per ablated setting, whether the members' validation
losses rank them as their test perplexities and zero-shot means do.

The rule of issue 14 chooses on validation loss only. This checks, after the fact, what that choice cost: Spearman's
rank correlation between validation loss and WikiText-2 perplexity (and the 7-task mean, where scored) over the
members of one seed, and the regret, the chosen member's perplexity minus the best perplexity any member reached.
Test numbers are read here, never used to choose.

    python -m lcc_jax.study.agreement results/smollm2/ablation results/qwen2.5-coder-1.5b/ablation [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from lcc_jax.study.table import load_rows


def agreement(rows: Sequence[dict], seed: int = 0) -> dict[str, Any] | None:
    """For one setting's member rows: {"members", "rho_ppl", "rho_acc", "scored", "chosen", "best", "regret"}, or
    None when fewer than three members of `seed` have both a validation loss and a perplexity."""
    usable = [r for r in rows if r.get("seed") == seed and r.get("valid_loss") is not None and r.get("ppl") is not None]
    if len(usable) < 3:
        return None
    loss = np.array([r["valid_loss"] for r in usable])
    ppl = np.array([r["ppl"] for r in usable])
    scored = [r for r in usable if r.get("mean_acc") is not None]
    rho_acc = None
    if len(scored) >= 3:  # a lower loss should go with a higher accuracy: the sign is flipped to read like rho_ppl
        rho_acc = float(-spearmanr([r["valid_loss"] for r in scored], [r["mean_acc"] for r in scored]).statistic)
    chosen, best = usable[int(np.argmin(loss))], usable[int(np.argmin(ppl))]
    return {"members": len(usable), "rho_ppl": float(spearmanr(loss, ppl).statistic), "rho_acc": rho_acc,
            "scored": len(scored), "chosen": chosen["member"], "best": best["member"],
            "regret": float(chosen["ppl"] - best["ppl"])}


def table(folders: Sequence[Path], seed: int = 0) -> list[dict[str, Any]]:
    """One entry per (ablation folder, setting) with `agreement`'s figures."""
    out = []
    for folder in folders:
        for setting, rows in load_rows(Path(folder)).items():
            found = agreement(rows, seed)
            if found is not None:
                out.append({"folder": str(folder), "setting": setting, **found})
    return out


def markdown(entries: Sequence[dict]) -> str:
    lines = ["| ablation | setting | members | ρ(valid loss, ppl) | ρ(valid loss, −mean acc) | chosen on valid loss "
             "| lowest ppl | regret (ppl) |", "|---|---|---:|---:|---:|---|---|---:|"]
    for e in entries:
        acc = "–" if e["rho_acc"] is None else f"{e['rho_acc']:+.2f} ({e['scored']} scored)"
        lines.append(f"| {e['folder']} | {e['setting']} | {e['members']} | {e['rho_ppl']:+.2f} | {acc} "
                     f"| `{e['chosen']}` | `{e['best']}` | {e['regret']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="scripts/ablate.py --out folders")
    parser.add_argument("--seed", type=int, default=0, help="the seed whose members are ranked (every member ran 0)")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}; pass the folders scripts/ablate.py --out wrote.")
    entries = table(args.folders, args.seed)
    if not entries:
        print(f"error: no setting in {', '.join(map(str, args.folders))} has three members of seed {args.seed} with "
              "a validation loss and a perplexity; run scripts/ablate.py there first.", file=sys.stderr)
        return 2
    print(markdown(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
