"""Compare the RestoreLCC authors' pipeline (run_official.py outputs) with an lcc_jax job folder, stage by stage.

    python -m benchmarks.official.compare --official OFFICIAL_DIR --lcc LCC_JOB_DIR \\
        [--out RESULTS.md] [--json compare.json] [--ppl --pruned-hf PRUNED_HF --ppl-chunks 40]

OFFICIAL_DIR holds one folder per seed (seed0/, seed1/, ... each written by run_official.py), or is one such
folder. LCC_JOB_DIR is `scripts/restore.py --out` (pairs.jsonl, dense_capture/, pruned_capture.npy,
components.npz, probes.npz, compensation.npz, summary.json, train_history.json).

Per official seed, against lcc_jax (and, as the noise floor, official seeds against each other):
  * probing pairs: prompts, positive and negative responses that differ (counts);
  * last-token o_proj inputs, the four sets: per (sample, head) vector ||a - b|| / ||b||, max and median
    (the ± sets over the pairs whose texts agree), and the SVD input ΔZ = dense(q) - pruned(q) per head;
  * lost components: principal angles between the spans of the top-K (default 10) rows of Vᵀ per head
    (overlap = mean cos² of the angles, 1 = same subspace), the first direction's |cos|, and the probe-time
    component c's cosine;
  * probes: Spearman rank correlation of the validation accuracies over all L·H heads;
  * head selection: |top-k ∩ top-k| / k;
  * compensation after training: cosine of δ_h = Vᵀβ + b per head on the heads both selected;
  * training: each trainer's own final validation loss (HF averages per batch, lcc_jax per token: not the
    same number); optional --valid-loss: the validation loss of the pruned model with each side's δ, one
    protocol; optional --ppl: WikiText-2 perplexity (lcc_jax's protocol, first --ppl-chunks chunks) of the
    pruned model with each side's δ folded into o_proj's bias; optional --zeroshot: the 7-task suite's mean
    accuracy (lcc_jax's zero-shot scorer, first --zeroshot-limit documents per task) with each side's δ.

Several --lcc folders (one per seed, e.g. `restore.py --seed 1`): the first is compared stage by stage, and
every one is evaluated, so that the final numbers of both sides are mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np

SETS = ("dense_prompt", "dense_positive", "dense_negative", "pruned_prompt")
NOT_MEASURED = "not yet measured"


# ----------------------------------------------------------------------------------- loading


class Side:
    """One run's stage outputs, in a common form: heads indexed l·H + h, arrays (N, L·H, d) fp32."""

    def __init__(self, name: str, pairs, captures, basis, component, accuracy, heads, delta, valid_loss, meta):
        self.name, self.pairs, self.captures = name, pairs, captures
        self.basis, self.component, self.accuracy = basis, component, accuracy
        self.heads, self.delta, self.valid_loss, self.meta = heads, delta, valid_loss, meta


def load_lcc(folder: Path, mmap: bool = True) -> Side:
    mode = "r" if mmap else None
    pairs = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines() if line.strip()]
    pairs = [(p["prompt"], p["positive"], p["negative"]) for p in pairs]
    captures = {name: np.load(folder / "dense_capture" / f"{name}.npy", mmap_mode=mode) for name in SETS[:3]}
    captures["pruned_prompt"] = np.load(folder / "pruned_capture.npy", mmap_mode=mode)
    with np.load(folder / "components.npz") as f:
        basis, component = f["basis"].astype(np.float32), f["component"].astype(np.float32)
    with np.load(folder / "probes.npz") as f:
        accuracy = f["accuracy"].astype(np.float64)
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else {}
    heads = np.asarray(summary.get("selected_heads", []), np.int64)
    delta = None
    if (folder / "compensation.npz").exists() and heads.size:
        with np.load(folder / "compensation.npz") as f:
            beta = f["beta"] if "beta" in f.files else np.zeros((heads.size, basis.shape[-1]), np.float32)
            bias = f["bias"] if "bias" in f.files else np.zeros((heads.size, basis.shape[-1]), np.float32)
        delta = np.zeros(component.shape, np.float32)  # (L·H, d)
        delta[heads] = np.einsum("ki,kid->kd", beta, basis[heads]) + bias
    history = json.loads((folder / "train_history.json").read_text()) if (folder / "train_history.json").exists() else {}
    valid = history.get("valid_loss") or [None]
    meta = {"summary": summary, "train_history": history}
    for name in ("run.json", "eval_dense.json", "eval_pruned.json", "eval_restored.json"):
        if (folder / name).exists():
            meta[name] = json.loads((folder / name).read_text())
    seed = meta.get("run.json", {}).get("restore", {}).get("seed")
    name = "lcc_jax" if seed is None else f"lcc_jax_seed{seed}"
    return Side(name, pairs, captures, basis, component, accuracy, heads, delta, valid[-1], meta)


def load_official(folder: Path, mmap: bool = True) -> Side:
    mode = "r" if mmap else None
    raw = json.loads((folder / "pairs.json").read_text())
    pairs = list(zip(raw["prompts"], raw["positive"], raw["negative"], strict=True))
    captures = {name: np.load(folder / "captures" / f"{name}.npy", mmap_mode=mode) for name in SETS}
    with np.load(folder / "components.npz") as f:
        basis, component = f["basis"].astype(np.float32), f["component"].astype(np.float32)
    with np.load(folder / "probes.npz") as f:
        accuracy = f["accuracy"].astype(np.float64)
    heads, delta, valid = np.zeros(0, np.int64), None, None
    if (folder / "trained.npz").exists():
        with np.load(folder / "trained.npz") as f:
            heads = f["heads"].astype(np.int64)
            delta = f["delta"].reshape(-1, f["delta"].shape[-1]).astype(np.float32)
    if (folder / "train_history.json").exists():
        evals = [e["eval_loss"] for e in json.loads((folder / "train_history.json").read_text()) if "eval_loss" in e]
        valid = evals[-1] if evals else None
    meta = {}
    for name in ("meta.json", "timings.json"):
        if (folder / name).exists():
            meta[name] = json.loads((folder / name).read_text())
    return Side(folder.name, pairs, captures, basis, component, accuracy, heads, delta, valid, meta)


def official_folders(root: Path) -> list[Path]:
    if (root / "probes.npz").exists():
        return [root]
    found = sorted((p for p in root.iterdir() if p.is_dir() and (p / "probes.npz").exists()),
                   key=lambda p: (len(p.name), p.name))
    if not found:
        raise SystemExit(f"{root} holds no run_official.py output (no */probes.npz)")
    return found


# ----------------------------------------------------------------------------------- metrics


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho with average ranks for ties (scipy.stats.spearmanr's definition)."""
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return ranks


def compare_pairs(a: Side, b: Side) -> dict:
    n = min(len(a.pairs), len(b.pairs))
    diff = [sum(x[i] != y[i] for x, y in zip(a.pairs[:n], b.pairs[:n])) for i in range(3)]
    same = [i for i in range(n) if a.pairs[i] == b.pairs[i]]
    return {"n_a": len(a.pairs), "n_b": len(b.pairs), "prompt_mismatches": diff[0], "positive_mismatches": diff[1],
            "negative_mismatches": diff[2], "identical_pairs": len(same)}


def _row_rel(a: np.ndarray, b: np.ndarray, rows: np.ndarray | None, chunk: int = 64) -> tuple[float, float, float]:
    """max and median over (sample, head) rows of ||a - b|| / ||b||, and max|a - b| / max|b|."""
    n = a.shape[0] if rows is None else len(rows)
    rels, max_err, max_ref = [], 0.0, 0.0
    for start in range(0, n, chunk):
        index = slice(start, start + chunk) if rows is None else rows[start : start + chunk]
        x, y = np.asarray(a[index], np.float32), np.asarray(b[index], np.float32)
        err, ref = np.linalg.norm(x - y, axis=-1), np.linalg.norm(y, axis=-1)
        rels.append((err / np.maximum(ref, 1e-12)).ravel())
        max_err, max_ref = max(max_err, float(np.abs(x - y).max())), max(max_ref, float(np.abs(y).max()))
    rel = np.concatenate(rels) if rels else np.zeros(1)
    return float(rel.max()), float(np.median(rel)), max_err / max(max_ref, 1e-30)


def compare_captures(a: Side, b: Side) -> dict:
    out = {}
    n = min(a.captures["dense_prompt"].shape[0], b.captures["dense_prompt"].shape[0])
    same = np.asarray([i for i in range(n) if a.pairs[i] == b.pairs[i]], np.int64)
    for name in SETS:
        x, y = a.captures[name], b.captures[name]
        if x.shape[1:] != y.shape[1:]:
            out[name] = {"error": f"shapes differ: {x.shape} vs {y.shape}"}
            continue
        rows = same if name in ("dense_positive", "dense_negative") else np.arange(n)
        worst, median, peak = _row_rel(x, y, rows)
        out[name] = {"rows": int(len(rows)), "max_rel": worst, "median_rel": median, "max_abs_over_max": peak}
    # the SVD input, per head: ||ΔZ_a - ΔZ_b||_F / ||ΔZ_b||_F
    heads = a.captures["dense_prompt"].shape[1]
    num, den = np.zeros(heads), np.zeros(heads)
    for start in range(0, n, 64):
        s = slice(start, min(start + 64, n))
        da = np.asarray(a.captures["dense_prompt"][s], np.float32) - np.asarray(a.captures["pruned_prompt"][s], np.float32)
        db = np.asarray(b.captures["dense_prompt"][s], np.float32) - np.asarray(b.captures["pruned_prompt"][s], np.float32)
        num += ((da - db) ** 2).sum(axis=(0, 2))
        den += (db ** 2).sum(axis=(0, 2))
    rel = np.sqrt(num / np.maximum(den, 1e-30))
    out["delta_z"] = {"max_rel": float(rel.max()), "median_rel": float(np.median(rel))}
    return out


def principal_cosines(a_rows: np.ndarray, b_rows: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between the row spans of a_rows and b_rows (each (K, d))."""
    qa, _ = np.linalg.qr(np.asarray(a_rows, np.float64).T)
    qb, _ = np.linalg.qr(np.asarray(b_rows, np.float64).T)
    return np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), 0.0, 1.0)


def compare_components(a: Side, b: Side, k: int) -> dict:
    heads = a.basis.shape[0]
    n = min(a.captures["dense_prompt"].shape[0], b.captures["dense_prompt"].shape[0])
    k = max(1, min(k, n, a.basis.shape[1]))
    overlap, largest, first, comp_cos = [], [], [], []
    for h in range(heads):
        cos = principal_cosines(a.basis[h, :k], b.basis[h, :k])
        overlap.append(float(np.mean(cos**2)))
        largest.append(float(np.degrees(np.arccos(cos.min()))))
        first.append(abs(float(_cos(a.basis[h, 0], b.basis[h, 0]))))
        comp_cos.append(float(_cos(a.component[h], b.component[h])))
    return {"k": k, "overlap_mean": float(np.mean(overlap)), "overlap_min": float(np.min(overlap)),
            "largest_angle_deg_median": float(np.median(largest)), "largest_angle_deg_max": float(np.max(largest)),
            "first_direction_abs_cos_median": float(np.median(first)),
            "component_cos_median": float(np.median(comp_cos)), "component_cos_min": float(np.min(comp_cos))}


def _cos(x: np.ndarray, y: np.ndarray) -> float:
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    return float(np.dot(x, y) / (nx * ny)) if nx > 0 and ny > 0 else float("nan")


def compare_probes(a: Side, b: Side) -> dict:
    return {"spearman": spearman(a.accuracy, b.accuracy), "mean_acc_a": float(a.accuracy.mean()),
            "mean_acc_b": float(b.accuracy.mean()), "max_abs_diff": float(np.abs(a.accuracy - b.accuracy).max())}


def compare_heads(a: Side, b: Side) -> dict:
    k = min(a.heads.size, b.heads.size)
    if k == 0:
        return {"k": 0, "overlap": float("nan")}
    common = np.intersect1d(a.heads[:k], b.heads[:k])
    return {"k": int(k), "common": int(common.size), "overlap": common.size / k}


def compare_delta(a: Side, b: Side) -> dict:
    if a.delta is None or b.delta is None:
        return {"common": 0}
    common = np.intersect1d(a.heads, b.heads)
    cos = np.asarray([_cos(a.delta[h], b.delta[h]) for h in common])
    ratio = np.asarray([np.linalg.norm(a.delta[h]) / max(np.linalg.norm(b.delta[h]), 1e-30) for h in common])
    if not common.size:
        return {"common": 0}
    return {"common": int(common.size), "cos_mean": float(np.mean(cos)), "cos_median": float(np.median(cos)),
            "cos_min": float(np.min(cos)), "norm_ratio_median": float(np.median(ratio))}


def compare(a: Side, b: Side, k: int) -> dict:
    return {"pairs": compare_pairs(a, b), "captures": compare_captures(a, b), "components": compare_components(a, b, k),
            "probes": compare_probes(a, b), "heads": compare_heads(a, b), "delta": compare_delta(a, b),
            "valid_loss": [a.valid_loss, b.valid_loss]}


# ----------------------------------------------------------------------------------- perplexity


def deltas(sides: list[Side], config) -> list[tuple[str, np.ndarray]]:
    """("pruned", zeros) and each trained side's δ, as (layers, heads, head_dim) arrays."""
    shape = (config.num_layers, config.num_heads, config.head_dim)
    return [("pruned", np.zeros(shape, np.float32))] + [(s.name, s.delta.reshape(shape)) for s in sides
                                                         if s.delta is not None]


def perplexities(sides: list[Side], model, tokenizer, chunks: int | None, seqlen: int = 2048) -> dict[str, float]:
    """WikiText-2 ppl (lcc_jax's protocol) of the pruned model, and of it with each side's δ folded into
    o_proj's bias (the exported form)."""
    import jax.numpy as jnp

    from lcc_jax.eval.perplexity import perplexity_of_tokens, wikitext2_test_ids
    from lcc_jax.restore.fold import fold_compensation

    ids = wikitext2_test_ids(tokenizer)
    return {name: perplexity_of_tokens(fold_compensation(model, jnp.asarray(delta, model.dtype)), ids, seqlen,
                                       limit_chunks=chunks)
            for name, delta in deltas(sides, model.config)}


def valid_losses(sides: list[Side], model, tokenizer, valid: Path, num_valid: int | None,
                 max_length: int = 500, batch_size: int = 8) -> dict[str, float]:
    """Response-token NLL on the validation samples (mean over all their target tokens, lcc_jax's trainer
    protocol) of the pruned model, and of it with each side's δ: one protocol for both sides (the two
    trainers average differently: HF Trainer per batch, lcc_jax per token)."""
    import jax.numpy as jnp

    from lcc_jax.data.instructions import load_instructions
    from lcc_jax.restore.config import RestoreConfig
    from lcc_jax.restore.steps import training_data
    from lcc_jax.train import evaluate

    restore = RestoreConfig(valid_data=str(valid), num_valid=num_valid or 10**9, max_length=max_length,
                            batch_size=batch_size, num_train=1, num_probe=1)
    batches = training_data(restore, tokenizer, load_instructions(str(valid), limit=1)).valid

    def apply(model, delta, tokens, mask):
        return model(tokens, mask, compensation=delta.astype(model.dtype)).logits

    return {name: evaluate(model, jnp.asarray(delta), apply, batches) for name, delta in deltas(sides, model.config)}


def zeroshot_means(sides: list[Side], model, tokenizer, limit: int | None) -> dict[str, dict]:
    """The 7-task suite (lcc_jax's scorer) of the pruned model and of it with each side's δ, added to every
    o_proj input as the compensation (the same function as the folded bias, one compile for all sides)."""
    import jax.numpy as jnp

    from lcc_jax.eval.zeroshot import zeroshot

    out = {}
    for name, delta in deltas(sides, model.config):
        result = zeroshot(model, tokenizer, "suite", limit=limit,
                          model_kwargs={"compensation": jnp.asarray(delta, model.dtype)})
        out[name] = {"mean": result.suite_mean if result.suite_mean is not None else result.mean,
                     "tasks": {t: r.acc for t, r in result.tasks.items()},
                     "correct": {t: r.correct for t, r in result.tasks.items()}}  # each document's 0/1, in order
    return out


def _side(name: str) -> str | None:
    return "lcc_jax" if name.startswith("lcc_jax") else "official" if name.startswith("seed") else None


def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> dict[str, float]:
    """mean(a) - mean(b) with Welch's t interval over seeds (unequal variances)."""
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = float(np.sqrt(va + vb))
    df = float((va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))) if se > 0 else float("inf")
    half = float(stats.t.ppf((1 + level) / 2, df)) * se if se > 0 else 0.0
    diff = float(a.mean() - b.mean())
    return {"diff": diff, "low": diff - half, "high": diff + half, "df": df}


def side_differences(result: dict) -> dict[str, dict]:
    """lcc_jax against the authors' code on each final number: the difference of the seed means with Welch's
    interval over seeds, the paired-bootstrap interval over documents (chunks) of the seed-averaged outcomes
    (`lcc_jax.eval.bootstrap`: document noise only), and whether lcc_jax's mean lies in the official seeds'
    range. Needs two seeds or more on each side."""
    from lcc_jax.eval.bootstrap import accuracy_interval, perplexity_interval

    out: dict[str, dict] = {}
    summary = result.get("seed_summary") or {}
    if not all(summary.get(side, {}) for side in ("lcc_jax", "official")):
        return out
    for metric in ("ppl", "valid_loss", "zeroshot_mean"):
        values = {side: [] for side in ("lcc_jax", "official")}
        source = {"ppl": result.get("perplexity") or {}, "valid_loss": result.get("valid_loss") or {},
                  "zeroshot_mean": {k: v["mean"] for k, v in (result.get("zeroshot") or {}).items()}}[metric]
        for name, value in source.items():
            if _side(name):
                values[_side(name)].append(float(value))
        if min(len(v) for v in values.values()) < 2:
            continue
        official = summary["official"][metric]
        row = {"welch": welch_interval(values["lcc_jax"], values["official"]),
               "lcc_mean_inside_official_range": official["min"] <= float(np.mean(values["lcc_jax"])) <= official["max"],
               "lcc_seeds_inside_official_range": int(sum(official["min"] <= v <= official["max"]
                                                          for v in values["lcc_jax"])),
               "n": {side: len(v) for side, v in values.items()}}
        if metric == "ppl" and result.get("perplexity_chunk_nll"):
            chunks = {side: [np.asarray(nll) for name, nll in result["perplexity_chunk_nll"].items()
                             if _side(name) == side] for side in values}
            row["bootstrap"] = perplexity_interval(np.mean(chunks["lcc_jax"], 0), np.mean(chunks["official"], 0)).to_dict()
        if metric == "zeroshot_mean" and all("correct" in v for v in (result.get("zeroshot") or {}).values()):
            outcomes: dict[str, dict[str, list[np.ndarray]]] = {side: {} for side in values}
            for name, r in result["zeroshot"].items():
                if _side(name):
                    for task, bits in r["correct"].items():
                        outcomes[_side(name)].setdefault(task, []).append(np.frombuffer(bits.encode(), np.uint8) - 48)
            averaged = {side: {t: np.mean(v, 0) for t, v in by_task.items()} for side, by_task in outcomes.items()}
            row["bootstrap"] = accuracy_interval(averaged["lcc_jax"], averaged["official"]).to_dict()
        out[metric] = row
    return out


def seed_summary(result: dict) -> dict[str, dict]:
    """Mean ± std (sample, ddof 1) over seeds of each side's final numbers: 'official' and 'lcc_jax'."""
    groups: dict[str, dict[str, list[float]]] = {}
    metrics = {"ppl": result.get("perplexity") or {}, "valid_loss": result.get("valid_loss") or {},
               "zeroshot_mean": {k: v["mean"] for k, v in (result.get("zeroshot") or {}).items()}}
    for metric, values in metrics.items():
        for name, value in values.items():
            side = _side(name)
            if side and value is not None:
                groups.setdefault(side, {}).setdefault(metric, []).append(float(value))
    out = {}
    for side, by_metric in groups.items():
        out[side] = {m: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"),
                         "min": float(np.min(v)), "max": float(np.max(v)), "n": len(v)} for m, v in by_metric.items()}
    return out


# ----------------------------------------------------------------------------------- report


def _f(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{x:.{digits}g}"


ROWS = [  # (stage, metric, getter)
    ("probing pairs", "prompts / positives / negatives that differ",
     lambda r: f"{r['pairs']['prompt_mismatches']} / {r['pairs']['positive_mismatches']} / "
               f"{r['pairs']['negative_mismatches']} of {min(r['pairs']['n_a'], r['pairs']['n_b'])}"),
    *[(f"o_proj inputs: {name}", "max / median ‖a−b‖/‖b‖ per (sample, head)",
       (lambda name: lambda r: f"{_f(r['captures'][name].get('max_rel'))} / {_f(r['captures'][name].get('median_rel'))}")(name))
      for name in SETS],
    ("ΔZ = dense(q) − pruned(q)", "max / median ‖ΔZa−ΔZb‖F / ‖ΔZb‖F per head",
     lambda r: f"{_f(r['captures']['delta_z']['max_rel'])} / {_f(r['captures']['delta_z']['median_rel'])}"),
    ("lost components (top-K Vᵀ)", "subspace overlap mean cos² (mean / min over heads)",
     lambda r: f"{_f(r['components']['overlap_mean'])} / {_f(r['components']['overlap_min'])}"),
    ("lost components", "largest principal angle, degrees (median / max)",
     lambda r: f"{_f(r['components']['largest_angle_deg_median'], 3)} / {_f(r['components']['largest_angle_deg_max'], 3)}"),
    ("probe-time component c", "cosine (median / min over heads)",
     lambda r: f"{_f(r['components']['component_cos_median'])} / {_f(r['components']['component_cos_min'])}"),
    ("probes", "Spearman of validation accuracy over all heads", lambda r: _f(r["probes"]["spearman"])),
    ("probes", "mean accuracy (a / b)",
     lambda r: f"{_f(r['probes']['mean_acc_a'])} / {_f(r['probes']['mean_acc_b'])}"),
    ("head selection", "top-k overlap: shared heads / k",
     lambda r: f"{_f(r['heads']['overlap'], 3)} ({r['heads'].get('common', 0)}/{r['heads']['k']})"),
    ("compensation δ = Vᵀβ + b", "cosine on common heads (mean / min)",
     lambda r: f"{_f(r['delta'].get('cos_mean'))} / {_f(r['delta'].get('cos_min'))} (n={r['delta']['common']})"),
    ("compensation δ", "‖δa‖/‖δb‖ median", lambda r: _f(r["delta"].get("norm_ratio_median"))),
    ("training", "each trainer's own final validation loss (a / b; HF averages per batch)",
     lambda r: f"{_f(r['valid_loss'][0])} / {_f(r['valid_loss'][1])}"),
]


def markdown(result: dict) -> str:
    seeds = list(result.get("lcc_vs_official") or {})
    header = ["stage", "metric"] + [f"lcc_jax vs official {s}" for s in seeds]
    has_floor = bool(result.get("official_vs_official"))
    if has_floor:
        header.append("official vs official (" + ", ".join(result["official_vs_official"]) + ")")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for stage, metric, get in ROWS:
        cells = []
        for s in seeds:
            try:
                cells.append(get(result["lcc_vs_official"][s]))
            except (KeyError, TypeError):
                cells.append("–")
        if has_floor:
            floor = []
            for r in result["official_vs_official"].values():
                try:
                    floor.append(get(r))
                except (KeyError, TypeError):
                    floor.append("–")
            cells.append("; ".join(floor))
        lines.append(f"| {stage} | {metric} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if result.get("perplexity"):
        ppl = result["perplexity"]
        text += "\nWikiText-2 perplexity (lcc_jax's protocol, " + str(result.get("ppl_chunks") or "all") + " chunks), "
        text += "pruned model with each side's δ folded into o_proj's bias:\n\n| model | ppl |\n|---|---|\n"
        text += "".join(f"| {name} | {value:.4f} |\n" for name, value in ppl.items())
    if result.get("valid_loss"):
        text += ("\nAlpaca validation loss (response tokens, mean over all tokens of " + str(result.get("num_valid") or "all")
                 + " samples, one protocol for both), pruned model with each side's δ:\n\n| model | loss |\n|---|---|\n")
        text += "".join(f"| {name} | {value:.5f} |\n" for name, value in result["valid_loss"].items())
    if result.get("zeroshot"):
        zs = result["zeroshot"]
        tasks = list(next(iter(zs.values()))["tasks"])
        text += ("\nZero-shot accuracy (lcc_jax's scorer, " + (f"first {result['zeroshot_limit']} documents per task"
                 if result.get("zeroshot_limit") else "all documents") + "), pruned model with each side's δ:\n\n")
        text += "| model | 7-task mean | " + " | ".join(tasks) + " |\n|" + "---|" * (len(tasks) + 2) + "\n"
        text += "".join(f"| {name} | {100 * r['mean']:.2f} | " + " | ".join(f"{100 * r['tasks'][t]:.2f}" for t in tasks)
                        + " |\n" for name, r in zs.items())
    if result.get("seed_summary"):
        text += "\nFinal numbers over seeds, mean ± std (min – max):\n\n| side | seeds | WikiText-2 ppl | validation loss | 7-task mean acc (%) |\n|---|---|---|---|---|\n"
        for side, m in result["seed_summary"].items():
            def cell(key, scale=1.0, digits=3):
                if key not in m:
                    return "–"
                v = m[key]
                if v["n"] == 1:
                    return f"{scale * v['mean']:.{digits}f} (one seed)"
                return (f"{scale * v['mean']:.{digits}f} ± {scale * v['std']:.{digits}f} "
                        f"({scale * v['min']:.{digits}f} – {scale * v['max']:.{digits}f})")
            n = max(v["n"] for v in m.values())
            text += f"| {side} | {n} | {cell('ppl', digits=2)} | {cell('valid_loss', digits=4)} | {cell('zeroshot_mean', 100, 2)} |\n"
    if result.get("side_differences"):
        text += differences_markdown(result["side_differences"])
    return text


def differences_markdown(differences: dict) -> str:
    """lcc_jax − official per final number: seed means, Welch over seeds, paired bootstrap over documents."""
    labels = {"ppl": ("WikiText-2 ppl", 1.0, 3), "valid_loss": ("validation loss", 1.0, 4),
              "zeroshot_mean": ("7-task mean acc (points)", 100.0, 2)}
    text = ("\nlcc_jax − official (seed means; Welch's 95 % interval over seeds; 95 % paired-bootstrap interval over "
            "documents or chunks, each side's outcomes averaged over its seeds; is lcc_jax's mean inside the official "
            "seeds' min–max, and how many lcc_jax seeds are):\n\n| metric | difference | Welch 95 % (seeds) | "
            "bootstrap 95 % (documents) | lcc_jax mean inside official range | lcc_jax seeds inside |\n|---|---|---|---|---|---|\n")
    for metric, row in differences.items():
        label, scale, digits = labels[metric]
        w = row["welch"]
        boot = row.get("bootstrap")
        boot_text = f"[{scale * boot['low']:+.{digits}f}, {scale * boot['high']:+.{digits}f}]" if boot else "–"
        text += (f"| {label} | {scale * w['diff']:+.{digits}f} | [{scale * w['low']:+.{digits}f}, "
                 f"{scale * w['high']:+.{digits}f}] (df {w['df']:.1f}) | {boot_text} | "
                 f"{'yes' if row['lcc_mean_inside_official_range'] else 'no'} | "
                 f"{row['lcc_seeds_inside_official_range']} of {row['n']['lcc_jax']} |\n")
    return text


def not_measured_markdown(seeds=("seed0", "seed1", "seed2")) -> str:
    header = ["stage", "metric"] + [f"lcc_jax vs official {s}" for s in seeds] + ["official vs official"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for stage, metric, _ in ROWS:
        lines.append(f"| {stage} | {metric} | " + " | ".join([NOT_MEASURED] * (len(seeds) + 1)) + " |")
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    folders = args.lcc if isinstance(args.lcc, (list, tuple)) else [args.lcc]
    lccs = [load_lcc(folder) for folder in folders]
    lcc = lccs[0]
    officials = [load_official(p) for p in official_folders(args.official)]
    result = {"lcc": [str(f) for f in folders], "official": [str(p) for p in official_folders(args.official)], "k": args.k,
              "lcc_vs_official": {o.name: compare(lcc, o, args.k) for o in officials},
              "official_vs_official": {f"{a.name}~{b.name}": compare(a, b, args.k)
                                       for a, b in itertools.combinations(officials, 2)},
              "official_meta": {o.name: o.meta for o in officials},
              "lcc_meta": {k: v for k, v in lcc.meta.items() if k != "train_history"}}
    wanted = [flag for flag, on in (("--ppl", args.ppl), ("--valid-loss", getattr(args, "valid_loss", None)),
                                    ("--zeroshot", getattr(args, "zeroshot", False))) if on]
    if wanted and args.pruned_hf is None:
        raise SystemExit(f"{', '.join(wanted)} need(s) --pruned-hf")
    if wanted:
        import lcc_jax

        model, tokenizer, _ = lcc_jax.load(str(args.pruned_hf))  # once, for every evaluation below
        sides = [*lccs, *officials]
    if args.ppl:
        result["ppl_chunks"] = args.ppl_chunks
        ppl = perplexities(sides, model, tokenizer, args.ppl_chunks, args.ppl_seqlen)
        result["perplexity"] = {name: r.ppl for name, r in ppl.items()}
        result["perplexity_chunk_nll"] = {name: list(r.chunk_nll) for name, r in ppl.items()}
    if getattr(args, "valid_loss", None):
        result["num_valid"] = args.num_valid
        result["valid_loss"] = valid_losses(sides, model, tokenizer, args.valid_loss, args.num_valid)
    if getattr(args, "zeroshot", False):
        result["zeroshot_limit"] = args.zeroshot_limit
        result["zeroshot"] = zeroshot_means(sides, model, tokenizer, args.zeroshot_limit)
    result["seed_summary"] = seed_summary(result)
    result["side_differences"] = side_differences(result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, help="run_official.py output(s): seed folders")
    parser.add_argument("--lcc", type=Path, nargs="+", required=False,
                        help="lcc_jax job folder(s) (scripts/restore.py --out), one per seed; the first is compared stage by stage")
    parser.add_argument("--k", type=int, default=10, help="directions per head in the subspace comparison")
    parser.add_argument("--out", type=Path, default=None, help="markdown table (default: print)")
    parser.add_argument("--json", type=Path, default=None, help="all numbers as JSON")
    parser.add_argument("--title", default="lcc_jax against the authors' RestoreLCC code")
    parser.add_argument("--ppl", action="store_true", help="also WikiText-2 perplexity with each side's δ")
    parser.add_argument("--pruned-hf", type=Path, default=None, help="the pruned HF folder both sides started from")
    parser.add_argument("--ppl-chunks", type=int, default=None, help="evaluate the first N chunks (default: all)")
    parser.add_argument("--ppl-seqlen", type=int, default=2048)
    parser.add_argument("--valid-loss", type=Path, default=None, metavar="VALID_JSONL",
                        help="also the validation loss of each side's δ on these samples, one protocol (needs --pruned-hf)")
    parser.add_argument("--num-valid", type=int, default=None, help="first N of --valid-loss (default: all)")
    parser.add_argument("--zeroshot", action="store_true", help="also the 7-task zero-shot mean with each side's δ")
    parser.add_argument("--zeroshot-limit", type=int, default=None, help="first N documents per task (default: all)")
    parser.add_argument("--from-json", type=Path, default=None, metavar="COMPARE_JSON",
                        help="no measuring: recompute the summaries and differences of an earlier --json and write them")
    args = parser.parse_args(argv)
    if not args.from_json and (args.official is None or not args.lcc):
        parser.error("--official and --lcc are needed (or --from-json)")
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        result["seed_summary"] = seed_summary(result)
        result["side_differences"] = side_differences(result)
    else:
        result = run(args)
    text = f"## {args.title}\n\n" + markdown(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
