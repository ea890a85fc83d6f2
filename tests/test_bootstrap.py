"""Paired bootstrap intervals (eval.bootstrap), per-document outcomes in zero-shot results, and the recovery
table's difference columns."""

import numpy as np
import pytest

from lcc_jax.eval.bootstrap import accuracy_interval, perplexity_interval, resampled_means
from lcc_jax.eval.zeroshot import bits, unbits

TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def _pair(rng, n, p_a, p_b):
    """Correlated 0/1 outcomes: A and B share a per-document difficulty, as two models on one test set do."""
    u = rng.random(n)
    return (u < p_a).astype(float), (u < p_b).astype(float)


def test_identical_inputs_give_a_zero_width_interval_at_zero():
    rng = np.random.default_rng(0)
    a = {t: (rng.random(300) < 0.5).astype(float) for t in TASKS}
    iv = accuracy_interval(a, dict(a))
    assert (iv.diff, iv.low, iv.high) == (0.0, 0.0, 0.0) and not iv.excludes_zero
    nll = rng.normal(3.0, 0.2, 50)
    assert perplexity_interval(nll, nll).to_dict() | {"level": 0, "resamples": 0} == {
        "diff": 0.0, "low": 0.0, "high": 0.0, "level": 0, "resamples": 0}


def test_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(100):
        a, b = {}, {}
        for t in TASKS[:3]:
            a[t], b[t] = _pair(rng, 400, 0.55, 0.50)  # true mean difference 0.05
        iv = accuracy_interval(a, b, resamples=2000, seed=trial)
        covered += iv.low <= 0.05 <= iv.high
    assert 88 <= covered <= 100


def test_a_clear_effect_excludes_zero_and_no_effect_does_not():
    rng = np.random.default_rng(2)
    a, b = zip(*(_pair(rng, 1000, 0.60, 0.50) for _ in TASKS))
    iv = accuracy_interval(dict(zip(TASKS, a)), dict(zip(TASKS, b)))
    assert iv.low > 0.05 and iv.excludes_zero and iv.low < iv.diff < iv.high
    same = [(rng.random(200) < 0.5).astype(float) for _ in range(2)]
    assert not accuracy_interval({"rte": same[0]}, {"rte": same[1]}).excludes_zero


def test_pairing_resolves_a_small_difference_on_shared_documents():
    """A = B plus 30 of 1,000 documents right: unpaired, 3 points are noise at n=1,000; paired, they are not."""
    rng = np.random.default_rng(3)
    b = (rng.random(1000) < 0.5).astype(float)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:30]] = 1
    iv = accuracy_interval({"boolq": a}, {"boolq": b})
    assert iv.diff == pytest.approx(0.03) and 0.015 < iv.low and iv.high < 0.045


def test_same_seed_same_interval_other_seed_other_draws():
    rng = np.random.default_rng(4)
    a, b = _pair(rng, 500, 0.6, 0.5)
    first = accuracy_interval({"rte": a}, {"rte": b}, seed=7)
    assert accuracy_interval({"rte": a}, {"rte": b}, seed=7) == first
    columns = np.stack([a, b], axis=1)
    draws = [resampled_means(columns, 100, np.random.default_rng(s)) for s in (7, 7, 8)]
    assert np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[0], draws[2])


def test_count_draws_match_index_draws_in_distribution():
    """Drawing multinomial counts over distinct rows is the same bootstrap as drawing document indices."""
    rng = np.random.default_rng(5)
    columns = np.stack(_pair(rng, 300, 0.7, 0.4), axis=1)
    by_counts = resampled_means(columns, 20_000, np.random.default_rng(0))
    by_index = columns[np.random.default_rng(1).integers(0, 300, (20_000, 300))].mean(axis=1)
    diff_counts, diff_index = by_counts[:, 0] - by_counts[:, 1], by_index[:, 0] - by_index[:, 1]
    assert diff_counts.mean() == pytest.approx(diff_index.mean(), abs=1e-3)
    assert diff_counts.std() == pytest.approx(diff_index.std(), rel=0.03)


def test_perplexity_interval_of_a_shifted_model():
    rng = np.random.default_rng(6)
    b = rng.normal(3.0, 0.3, 100)
    a = b + 0.05 + rng.normal(0, 0.01, 100)  # A worse on every chunk
    iv = perplexity_interval(a, b)
    assert iv.diff == pytest.approx(np.exp(a.mean()) - np.exp(b.mean())) and iv.low > 0


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="same tasks"):
        accuracy_interval({"rte": [1.0]}, {"boolq": [1.0]})
    with pytest.raises(ValueError, match="same non-empty"):
        accuracy_interval({"rte": [1.0, 0.0]}, {"rte": [1.0]})


def test_bit_strings_round_trip():
    x = np.array([1, 0, 0, 1, 1], float)
    assert bits(x) == "10011" and np.array_equal(unbits(bits(x)), x)


# ------------------------------------------------------------------------------------------ the table


def _row(setting, method, seed, correct, nll):
    zs = {t: {"acc": float(np.mean(c)), "n": len(c), "correct": bits(c)} for t, c in correct.items()}
    return {"setting": setting, "method": method, "seed": seed, "ppl": float(np.exp(np.mean(nll))),
            "ppl_chunk_nll": list(nll), "zeroshot": zs, "mean_of": "suite",
            "mean_acc": float(np.mean([np.mean(c) for c in correct.values()]))}


def test_table_shows_differences_with_intervals_and_wins_only_where_they_exclude_zero():
    from lcc_jax.benchmark.table import differences_table, markdown_table, summarize

    rng = np.random.default_rng(7)
    u = {t: rng.random(400) for t in TASKS}
    nll = rng.normal(3.5, 0.2, 40)
    rows = [_row("wanda:0.5", "pruned", None, {t: (u[t] < 0.40).astype(float) for t in TASKS}, nll + 0.3)]
    for seed in (0, 1, 2):
        # LoRA clearly above the pruned model; RestoreLCC a hair below LoRA (per-document noise, seed by seed)
        rows.append(_row("wanda:0.5", "lora", seed, {t: (u[t] < 0.50).astype(float) for t in TASKS}, nll))
        flips = {t: (rng.random(400) < 0.01) for t in TASKS}
        rows.append(_row("wanda:0.5", "restorelcc", seed,
                         {t: np.where(flips[t], 1 - (u[t] < 0.50), u[t] < 0.50).astype(float) for t in TASKS},
                         nll + rng.normal(0, 0.001, 40)))
    summary = summarize(rows, resamples=2000)
    lora = next(e for e in summary if e["method"] == "lora")
    vs_pruned, vs_lcc = lora["vs"]["pruned"]["mean_acc"], lora["vs"]["restorelcc"]["mean_acc"]
    assert vs_pruned["diff"] == pytest.approx(lora["mean_acc"] - summary[0]["mean_acc"])
    assert vs_pruned["low"] > 0 and vs_lcc["low"] < 0 < vs_lcc["high"]
    assert lora["vs"]["pruned"]["ppl"]["high"] < 0  # lower perplexity than the pruned model
    table = markdown_table(summary)
    lora_line = next(line for line in table.splitlines() if "LoRA" in line)
    diff, low, high = (100 * vs_pruned[k] for k in ("diff", "low", "high"))
    assert f"{diff:+.2f} [{low:+.2f}, {high:+.2f}] win" in lora_line
    assert lora_line.count(" win") == 1 and " loss" not in lora_line
    assert "Δ mean vs pruned" in table and "±" in table
    ppl_line = next(line for line in differences_table(summary).splitlines() if "LoRA" in line)
    assert ppl_line.count("win") == 1  # lower is better for perplexity


def test_old_cells_without_per_document_outcomes_still_load_and_show_dashes():
    from lcc_jax.benchmark.table import differences_table, markdown_table, summarize

    rows = [{"setting": "wanda:0.5", "method": m, "seed": s, "ppl": 40.0, "mean_acc": 0.4, "mean_of": "1 tasks",
             "zeroshot": {"rte": {"acc": 0.4, "acc_norm": None, "n": 100}}} for m, s in
            (("pruned", None), ("lora", 0), ("restorelcc", 0))]
    summary = summarize(rows)
    nothing = {"mean_acc": None, "ppl": None}
    assert summary[1]["vs"] == {"pruned": nothing, "restorelcc": nothing}
    lora_line = next(line for line in markdown_table(summary).splitlines() if "LoRA" in line)
    assert "| 40.00 | 40.00 | – | – |" in lora_line
    assert "| wanda:0.5 | LoRA (q,v r8) | – | – |" in differences_table(summary)
