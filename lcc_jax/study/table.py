"""The ablation's table: every member's validation loss, perplexity and (finalists) zero-shot mean over seeds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lcc_jax.study.ablation import PAPER, REFERENCES
from lcc_jax.eval.recovery import setting_slug


def summarize(rows: list[dict]) -> list[dict]:
    """One line per member: mean ± std over its seeds of valid loss, ppl and mean accuracy; best valid loss first."""
    by_member: dict[str, list[dict]] = {}
    for row in rows:
        by_member.setdefault(row["member"], []).append(row)
    lines = []
    for member, group in by_member.items():
        line: dict[str, Any] = {"member": member, "seeds": sorted(r["seed"] for r in group),
                                "trainable_params": group[0].get("trainable_params"),
                                "finalist": any(r.get("finalist") for r in group)}
        for key in ("valid_loss", "ppl", "mean_acc"):
            values = [r[key] for r in group if r.get(key) is not None]
            line[key] = (float(np.mean(values)), float(np.std(values)), len(values)) if values else None
        lines.append(line)
    return sorted(lines, key=lambda x: x["valid_loss"][0] if x["valid_loss"] else np.inf)


def _cell(value, digits: int, scale: float = 1.0) -> str:
    if value is None:
        return "–"
    mean, std, n = value
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}" if n > 1 else f"{mean * scale:.{digits}f}"


def render(setting: str, lines: list[dict], pruned: dict | None) -> str:
    head = ["member (ranking:mode:top_k:lr)", "seeds", "Alpaca valid loss", "WikiText-2 ppl", "mean acc (7)",
            "trainable"]
    out = [f"### {setting}", ""]
    if pruned:
        acc = pruned.get("mean_acc")
        out.append(f"pruned: ppl {pruned['ppl']:.2f}" + (f", mean acc {100 * acc:.2f}" if acc is not None else ""))
        out.append("")
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for x in lines:
        tags = (" **(paper)**" if x["member"] == PAPER else "") + (" (reference)" if x["member"] in REFERENCES[1:] else "")
        out.append("| " + " | ".join([
            f"`{x['member']}`{tags}", ",".join(map(str, x["seeds"])), _cell(x["valid_loss"], 4),
            _cell(x["ppl"], 2), _cell(x["mean_acc"], 2, 100.0), f"{x['trainable_params']:,}" if x["trainable_params"] else "–",
        ]) + " |")
    return "\n".join(out) + "\n"


def write_ablation_report(out: Path, results: dict[str, list[dict]]) -> str:
    """Render every setting's table into out/ablation.md; returns the markdown."""
    out = Path(out)
    parts = ["# RestoreLCC ablation", "",
             "Members sorted by Alpaca validation loss (the selection criterion); mean ± std over seeds.", ""]
    for setting, rows in results.items():
        pruned_path = out / setting_slug(setting) / "pruned.json"
        pruned = json.loads(pruned_path.read_text()) if pruned_path.exists() else None
        parts.append(render(setting, summarize(rows), pruned))
    text = "\n".join(parts)
    (out / "ablation.md").write_text(text)
    return text
