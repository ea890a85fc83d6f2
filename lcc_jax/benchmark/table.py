"""The recovery benchmark's report: per-cell rows aggregated over seeds into results.json, a table and charts.

Rows with several seeds report mean ± sample standard deviation; dense and pruned rows have no seed.
Accuracies are shown in percent, the 7-task mean (BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c,
OBQA) when all of them ran, else the mean of the tasks that ran.

Each method's mean accuracy (and perplexity) is compared with the pruned model's and RestoreLCC's of the
same setting: the observed difference and its 95 % paired-bootstrap interval over documents (chunks),
computed on each document's outcome averaged over the method's seeds (`eval.bootstrap` says why). A
difference is called a "win" (or a "loss") only when its interval excludes zero. Cells written before
per-document outcomes were kept show "–" there.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lcc_jax.benchmark.cells import load_rows
from lcc_jax.benchmark.plots import plot_recovery
from lcc_jax.eval.bootstrap import RESAMPLES, accuracy_interval, perplexity_interval
from lcc_jax.eval.tasks import SUITE
from lcc_jax.eval.zeroshot import SHORT_NAMES, unbits
from lcc_jax.restore.job_folder import write_text

log = logging.getLogger(__name__)

METHOD_LABELS = {"dense": "dense", "pruned": "pruned", "lora": "LoRA (q,v r8)", "dora": "DoRA (all, r8)",
                 "masked_lora": "masked LoRA (all, r8)", "lofit": "LoFiT (budget-matched)",
                 "lofit_reference": "LoFiT (reference: 3 % of heads, 5 epochs)", "bias_only": "bias-only",
                 "restorelcc": "RestoreLCC", "restorelcc_recipe": "RestoreLCC (recipe)"}
TASK_ORDER = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")


REFERENCES = ("pruned", "restorelcc")  # every method is compared with these, in the same setting
PER_DOC_KEYS = ("correct", "correct_norm")  # per-document outcomes in a cell's zero-shot results


def summarize(rows: Sequence[dict], *, resamples: int = RESAMPLES, seed: int = 0) -> list[dict]:
    """One entry per (setting, method): mean and std over seeds of every measured figure, and `vs`: the paired
    differences of mean acc and ppl against each of `REFERENCES` (interval dicts, None where not computable)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["method"]), []).append(row)
    out = []
    for (setting, method), group in groups.items():
        entry: dict[str, Any] = {"setting": setting, "method": method, "seeds": [r.get("seed") for r in group]}
        for key in ("ppl", "mean_acc", "valid_loss", "trainable_params", "train_seconds", "tokens_seen", "params",
                    "sparsity_target", "sparsity_after_export", "eval_seconds"):
            entry[key], entry[f"{key}_std"] = _stats([r.get(key) for r in group])
        tasks = sorted({t for r in group for t in r.get("zeroshot", {})}, key=_task_key)
        entry["tasks"] = {}
        for task in tasks:
            mean, std = _stats([r.get("zeroshot", {}).get(task, {}).get("acc") for r in group])
            entry["tasks"][task] = {"acc": mean, "acc_std": std}
        entry["mean_of"] = group[0].get("mean_of")
        entry["vs"] = {ref: paired_differences(group, groups.get((setting, ref)), resamples, seed)
                       for ref in REFERENCES if method not in (ref, "dense")}
        out.append(entry)
    return out


def paired_differences(group: Sequence[dict], reference: Sequence[dict] | None, resamples: int = RESAMPLES,
                       seed: int = 0) -> dict:
    """{"mean_acc": Interval dict | None, "ppl": Interval dict | None} of `group` minus `reference`."""
    out: dict[str, dict | None] = {"mean_acc": None, "ppl": None}
    if not reference:
        return out
    a, b = _outcomes(group), _outcomes(reference)
    if a is not None and b is not None and a.keys() == b.keys() and all(a[t].size == b[t].size for t in a):
        out["mean_acc"] = accuracy_interval(a, b, resamples=resamples, seed=seed).to_dict()
    a, b = _seed_average([r.get("ppl_chunk_nll") for r in group]), _seed_average([r.get("ppl_chunk_nll")
                                                                                   for r in reference])
    if a is not None and b is not None and a.size == b.size:
        out["ppl"] = perplexity_interval(a, b, resamples=resamples, seed=seed).to_dict()
    return out


def _outcomes(group: Sequence[dict]) -> dict[str, np.ndarray] | None:
    """Each task of the mean (`mean_of`): every document's acc averaged over the group's seeds; None if missing."""
    tasks = set(group[0].get("zeroshot") or {})
    if not tasks or any(set(r.get("zeroshot") or {}) != tasks or r.get("mean_of") != group[0].get("mean_of")
                        for r in group):
        return None
    if group[0].get("mean_of") == "suite":
        tasks = set(SUITE)
    out = {}
    for task in tasks:
        bits = [r["zeroshot"].get(task, {}).get("correct") for r in group]
        mean = _seed_average([None if b is None else unbits(b) for b in bits])
        if mean is None:
            return None
        out[task] = mean
    return out


def _seed_average(values: Sequence[Sequence[float] | None]) -> np.ndarray | None:
    """Element-wise mean over seeds, or None when any seed lacks the values or their lengths differ."""
    if not values or any(v is None or len(v) == 0 for v in values) or len({len(v) for v in values}) != 1:
        return None
    return np.mean(np.asarray(values, np.float64), axis=0)


def markdown_table(summary: Sequence[dict]) -> str:
    """The recovery table: the Alpaca validation loss (what may choose between methods), ppl, each task's acc,
    the mean and its differences from the pruned model and from RestoreLCC (with intervals), trainable params,
    train time, tokens, sparsity."""
    tasks = sorted({t for e in summary for t in e["tasks"]}, key=_task_key)
    mean_label = "mean (7 tasks)" if any(e.get("mean_of") == "suite" for e in summary) else "mean"
    head = ["setting", "method", "Alpaca valid loss", "WikiText-2 ppl", *(SHORT_NAMES.get(t, t) for t in tasks),
            mean_label,
            "Δ mean vs pruned", "Δ mean vs RestoreLCC", "trainable params", "train s", "tokens seen",
            "sparsity after export"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for e in summary:
        cells = [e["setting"], METHOD_LABELS.get(e["method"], e["method"]),
                 _fmt(e.get("valid_loss"), e.get("valid_loss_std"), 4), _fmt(e["ppl"], e["ppl_std"], 2)]
        cells += [_fmt(_pct(e["tasks"].get(t, {}).get("acc")), _pct(e["tasks"].get(t, {}).get("acc_std")), 2)
                  for t in tasks]
        cells.append(_fmt(_pct(e["mean_acc"]), _pct(e["mean_acc_std"]), 2))
        cells += [delta_cell((e.get("vs", {}).get(ref) or {}).get("mean_acc"), scale=100) for ref in REFERENCES]
        cells.append("–" if e["trainable_params"] is None else f"{int(e['trainable_params']):,}")
        cells.append(_fmt(e["train_seconds"], e["train_seconds_std"], 1))
        cells.append("–" if e["tokens_seen"] is None else f"{int(e['tokens_seen']):,}")
        cells.append(_sparsity(e))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def differences_table(summary: Sequence[dict]) -> str:
    """Perplexity differences with their intervals (the main table has the accuracy ones), and a legend."""
    lines = ["| setting | method | Δ ppl vs pruned | Δ ppl vs RestoreLCC |", "|---|---|---:|---:|"]
    for e in summary:
        if e.get("vs"):
            cells = [delta_cell((e["vs"].get(ref) or {}).get("ppl"), lower_wins=True) for ref in REFERENCES]
            label = METHOD_LABELS.get(e["method"], e["method"])
            lines.append(f"| {e['setting']} | {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Δ: this row minus the pruned model (RestoreLCC) of its setting, accuracy in points; [95 % paired "
                 "bootstrap interval over documents (chunks), seed-averaged outcomes]; win / loss only where the "
                 "interval excludes zero; –: not computable (no per-document outcomes kept).")
    return "\n".join(lines)


def write_report(out: Path, config) -> dict:
    """results.json, table.md and the bar charts from every finished cell under `out`."""
    out = Path(out)
    rows = load_rows(out, config.settings)
    summary = summarize(rows)
    results = {"config": config.fingerprint(), "settings": list(config.settings), "methods": list(config.methods),
               "seeds": list(config.seeds), "rows": [_without_per_doc(r) for r in rows], "summary": summary}
    write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    write_text(out / "table.md", markdown_table(summary) + "\n\n" + differences_table(summary) + "\n")
    results["charts"] = _charts(out, summary)
    return results


def _charts(out: Path, summary: Sequence[dict]) -> list[str]:
    """Bar charts of perplexity and mean accuracy per setting and method; a failed chart is only logged."""
    rows = [{"setting": e["setting"], "method": METHOD_LABELS.get(e["method"], e["method"]), "ppl": e["ppl"],
             "ppl_std": e["ppl_std"], "mean_acc": None if e["mean_acc"] is None else 100 * e["mean_acc"],
             "mean_acc_std": None if e["mean_acc_std"] is None else 100 * e["mean_acc_std"]}
            for e in summary if e["method"] != "dense"]
    dense = next((e for e in summary if e["method"] == "dense"), None)
    if dense is not None:  # dense as a reference bar in every setting
        settings = list(dict.fromkeys(e["setting"] for e in summary if e["method"] != "dense"))
        rows = [{"setting": s, "method": "dense", "ppl": dense["ppl"], "ppl_std": None,
                 "mean_acc": None if dense["mean_acc"] is None else 100 * dense["mean_acc"], "mean_acc_std": None}
                for s in settings] + rows
    charts = []
    for metric in ("ppl", "mean_acc"):
        if not any(r[metric] is not None for r in rows):
            continue
        try:
            charts.append(str(plot_recovery(rows, out / f"recovery_{metric}.png", metric=metric, error=f"{metric}_std")))
        except ImportError as e:  # matplotlib missing: the table and JSON are what matters
            log.warning("no recovery chart (%s); pip install matplotlib", e)
            return charts
        except Exception as e:  # noqa: BLE001 - a chart must never lose the results
            log.warning("recovery chart for %s failed: %s", metric, e)
    return charts


def _without_per_doc(row: dict) -> dict:
    """A cell's row without per-chunk and per-document outcomes (they stay in the cell's own JSON)."""
    row = {k: v for k, v in row.items() if k != "ppl_chunk_nll"}
    if "zeroshot" in row:
        row["zeroshot"] = {t: {k: v for k, v in r.items() if k not in PER_DOC_KEYS} for t, r in row["zeroshot"].items()}
    return row


def delta_cell(interval: dict | None, *, scale: float = 1.0, lower_wins: bool = False) -> str:
    """"+2.79 [+1.10, +4.51] win": the difference, its interval, and win / loss where the interval excludes 0."""
    if interval is None:
        return "–"
    diff, low, high = (scale * interval[k] for k in ("diff", "low", "high"))
    verdict = ""
    if low > 0 or high < 0:
        verdict = " win" if (high < 0) == lower_wins else " loss"
    return f"{diff:+.2f} [{low:+.2f}, {high:+.2f}]{verdict}"


def _stats(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else None)


def _task_key(task: str) -> int:
    return TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER)


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _fmt(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _sparsity(e: dict) -> str:
    if e.get("sparsity_after_export") is not None:
        return f"{100 * e['sparsity_after_export']:.1f} % of {100 * e['sparsity_target']:.1f} %"
    if e.get("params") is not None:
        return f"{e['params'] / 1e6:.1f}M params"
    return "–"
