"""Paired bootstrap intervals for the difference between two models scored on the same documents.

    iv = accuracy_interval({"boolq": a_boolq, "rte": a_rte}, {"boolq": b_boolq, "rte": b_rte})
    iv.diff, iv.low, iv.high, iv.excludes_zero          # mean acc of A - mean acc of B, 95 % interval

Accuracy: the mean over tasks is the unweighted mean of per-task accuracies (the papers' headline).
Each resample draws, within each task independently, as many documents as the task has, with
replacement, and uses the *same* draws for A and B (paired), so what differs between them is the
models, not the documents. The interval is the percentile interval of the resampled differences.
Perplexity: the same over chunks of the text, on exp(mean NLL of A) - exp(mean NLL of B).

A resample is drawn as counts, not indices: drawing n documents uniformly with replacement gives each
distinct (a, b) pair a Multinomial(n, its frequency) count, the same distribution at (resamples, distinct
pairs) cost instead of (resamples, n) — with 0/1 outcomes at most four pairs per task.

Several training seeds: each document's outcome is first averaged over the seeds (a fraction in
[0, 1]), then documents are resampled. The estimand is the seed-averaged model's accuracy on the
task's document population; the interval covers document noise only, conditional on the seeds run,
so the table also shows the ± std over seeds. (Resampling 3 seeds as well would give an interval
from three points that says more about the resampling than the seeds.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
_BLOCK = 1 << 22  # counts drawn at once: resamples x distinct values


@dataclasses.dataclass(frozen=True)
class Interval:
    """An observed difference (A - B) and its paired-bootstrap percentile interval."""

    diff: float
    low: float
    high: float
    level: float = LEVEL
    resamples: int = RESAMPLES

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def accuracy_interval(
    a: Mapping[str, Sequence[float]],
    b: Mapping[str, Sequence[float]],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """Interval of mean_t acc_t(A) - mean_t acc_t(B); `a[task]`, `b[task]`: (docs,) outcomes in [0, 1], same docs."""
    if set(a) != set(b) or not a:
        raise ValueError(f"A and B must cover the same tasks, not {sorted(a)} and {sorted(b)}.")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    observed = 0.0
    for task in sorted(a):
        pair = _paired(a[task], b[task], task)  # (docs, 2)
        means = resampled_means(pair, resamples, rng)  # (resamples, 2)
        total += means[:, 0] - means[:, 1]
        observed += float(pair[:, 0].mean() - pair[:, 1].mean())
    return _interval(observed / len(a), total / len(a), level, resamples)


def perplexity_interval(
    nll_a: Sequence[float],
    nll_b: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """Interval of ppl(A) - ppl(B), ppl = exp(mean per-chunk NLL), chunks resampled in pairs."""
    pair = _paired(nll_a, nll_b, "chunks")
    means = resampled_means(pair, resamples, np.random.default_rng(seed))
    stats = np.exp(means[:, 0]) - np.exp(means[:, 1])
    return _interval(float(np.exp(pair[:, 0].mean()) - np.exp(pair[:, 1].mean())), stats, level, resamples)


def resampled_means(columns: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, m) column means of `columns` (n, m) over n rows drawn with replacement, rows kept whole."""
    n = columns.shape[0]
    values, counts = np.unique(columns, axis=0, return_counts=True)  # (k, m), (k,)
    block = max(1, _BLOCK // len(values))
    out = [rng.multinomial(n, counts / n, size=min(block, resamples - start)) @ values / n
           for start in range(0, resamples, block)]
    return np.concatenate(out)


def _paired(a: Sequence[float], b: Sequence[float], what: str) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"{what}: A and B need the same non-empty list of items, not {a.shape} and {b.shape}.")
    return np.stack([a, b], axis=1)


def _interval(observed: float, stats: np.ndarray, level: float, resamples: int) -> Interval:
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return Interval(observed, float(low), float(high), level, resamples)
