"""The ablation's table: every member's validation loss, perplexity (with its paired difference from the paper's
setting) and (finalists) zero-shot mean over seeds, and the finalists' paired-bootstrap differences against the
reference members (`eval.bootstrap`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lcc_jax.benchmark.cells import setting_slug
from lcc_jax.benchmark.table import delta_cell, paired_differences
from lcc_jax.study.members import PAPER, REFERENCES

REFERENCE_NAMES = {PAPER: "paper", REFERENCES[1]: "LoFiT (budget-matched)", REFERENCES[2]: "bias-only"}


def load_rows(out: Path) -> dict[str, list[dict]]:
    """{setting: every member row found under out/<setting>/ablation/seed<k>/}, finalists marked."""
    results: dict[str, list[dict]] = {}
    for folder in sorted(Path(out).glob("*/ablation")):
        chosen = folder / "finalists.json"
        finalists = set(json.loads(chosen.read_text())["finalists"]) if chosen.exists() else set()
        rows = [json.loads(p.read_text()) for p in sorted(folder.glob("seed*/*.json"))]
        for row in rows:
            row["finalist"] = row["member"] in finalists
        if rows:
            results[rows[0]["setting"]] = rows
    return results


def summarize(rows: list[dict]) -> list[dict]:
    """One line per member: mean ± std over its seeds, best validation loss first, with its perplexity's paired
    difference from the paper's setting (on the seeds both have per-chunk losses for); finalists get their paired
    differences (ppl, mean accuracy) against each reference member on the seeds both were scored on."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["member"], []).append(row)
    scored = {m: [r for r in g if r.get("zeroshot")] for m, g in groups.items()}
    paper = [r for r in groups.get(PAPER, []) if r.get("ppl_chunk_nll")]
    lines = []
    for member, group in groups.items():
        line: dict[str, Any] = {"member": member, "seeds": sorted(r["seed"] for r in group),
                                "trainable_params": group[0].get("trainable_params"),
                                "finalist": any(r.get("finalist") for r in group), "vs": {}}
        for key in ("valid_loss", "ppl", "mean_acc"):
            values = [r[key] for r in group if r.get(key) is not None]
            line[key] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                         len(values)) if values else None
        chunked = [r for r in group if r.get("ppl_chunk_nll")]
        seeds = {r["seed"] for r in chunked} & {r["seed"] for r in paper}
        line["ppl_vs_paper"] = (paired_differences(_on_seeds(chunked, seeds), _on_seeds(paper, seeds))["ppl"]
                                if member != PAPER and seeds else None)
        if scored[member]:
            for ref in REFERENCES:
                seeds = {r["seed"] for r in scored[member]} & {r["seed"] for r in scored.get(ref, [])}
                if ref != member and seeds:
                    line["vs"][ref] = paired_differences(_on_seeds(scored[member], seeds),
                                                         _on_seeds(scored[ref], seeds))
        lines.append(line)
    return sorted(lines, key=lambda x: x["valid_loss"][0] if x["valid_loss"] else np.inf)


def _on_seeds(rows: list[dict], seeds: set) -> list[dict]:
    """The rows of `seeds`, in seed order."""
    return sorted((r for r in rows if r["seed"] in seeds), key=lambda r: r["seed"])


def _cell(value, digits: int, scale: float = 1.0) -> str:
    if value is None:
        return "–"
    mean, std, n = value
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}" if n > 1 else f"{mean * scale:.{digits}f}"


def render(setting: str, lines: list[dict], pruned: dict | None) -> str:
    """A markdown table of the members, then one of the finalists' differences with intervals."""
    head = ["member (ranking:mode:top_k:lr)", "seeds", "Alpaca valid loss", "WikiText-2 ppl", "Δ ppl vs paper",
            "mean acc (7)", "trainable"]
    out = [f"### {setting}", ""]
    if pruned:
        acc = pruned.get("mean_acc")
        out += [f"pruned: ppl {pruned['ppl']:.2f}" + (f", mean acc {100 * acc:.2f}" if acc is not None else ""), ""]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for x in lines:
        tag = f" ({REFERENCE_NAMES[x['member']]})" if x["member"] in REFERENCE_NAMES else ""
        params = f"{x['trainable_params']:,}" if x["trainable_params"] else "–"
        out.append("| " + " | ".join([f"`{x['member']}`{tag}", ",".join(map(str, x["seeds"])),
                                      _cell(x["valid_loss"], 4), _cell(x["ppl"], 2),
                                      delta_cell(x.get("ppl_vs_paper"), lower_wins=True),
                                      _cell(x["mean_acc"], 2, 100.0), params]) + " |")
    finalists = [x for x in lines if x["vs"]]
    if finalists:
        refs = [r for r in REFERENCES if any(r in x["vs"] for x in finalists)]
        head = ["finalist"] + [f"Δ ppl vs {REFERENCE_NAMES[r]}" for r in refs] + \
               [f"Δ mean acc vs {REFERENCE_NAMES[r]}" for r in refs]
        out += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for x in finalists:
            cells = [delta_cell((x["vs"].get(r) or {}).get("ppl"), lower_wins=True) for r in refs]
            cells += [delta_cell((x["vs"].get(r) or {}).get("mean_acc"), scale=100) for r in refs]
            out.append("| " + " | ".join([f"`{x['member']}`", *cells]) + " |")
    return "\n".join(out) + "\n"


def write_ablation_report(out: Path, results: dict[str, list[dict]] | None = None) -> str:
    """Every setting's tables (rows read from `out` unless given) into out/ablation.md; returns the markdown."""
    out = Path(out)
    results = load_rows(out) if results is None else results
    parts = ["# RestoreLCC ablation", "",
             "Members sorted by Alpaca validation loss (the selection criterion); mean ± std over seeds. "
             "Δ ppl vs paper: the member minus the paper's setting on the seeds both ran. "
             "Differences: finalist minus reference, on the seeds both ran, with the 95 % paired-bootstrap interval "
             "over documents (chunks for perplexity) of seed-averaged outcomes; win / loss only where it excludes 0.",
             ""]
    for setting, rows in results.items():
        pruned_path = out / setting_slug(setting) / "pruned.json"
        pruned = json.loads(pruned_path.read_text()) if pruned_path.exists() else None
        parts.append(render(setting, summarize(rows), pruned))
    text = "\n".join(parts)
    (out / "ablation.md").write_text(text)
    return text
