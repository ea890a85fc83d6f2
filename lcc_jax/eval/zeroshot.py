"""Zero-shot accuracy on the pruning literature's multiple-choice suite, scored like lm-evaluation-harness.

    result = zeroshot(model, tokenizer, "suite", limit=100)
    print(result.to_markdown())        # per-task acc / acc_norm and the 7-task mean

Every task's requests are pooled, sorted by length and scored in one batched pass (`loglik`); then,
per document, lm-eval's multiple-choice metrics: `acc` = [argmax_i ll_i == gold], `acc_norm` =
[argmax_i ll_i / len(choice_i in characters) == gold] (only where lm-eval reports it), each with
lm-eval's standard error of the mean (sample standard deviation / sqrt(n)). The headline is the mean
`acc` over BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c and OBQA (`SUITE`). Each `TaskResult` also
keeps every document's 0/1 outcome as a bit string (`correct`, `correct_norm`), so paired intervals
can be computed later (`lcc_jax.eval.bootstrap`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lcc_jax.eval import token_cache
from lcc_jax.eval.loglik import encode_requests, loglikelihood_tokens
from lcc_jax.eval.tasks import SUITE, TASKS, Doc, ZeroShotError, load_docs, resolve_tasks

log = logging.getLogger(__name__)

SHORT_NAMES = {"boolq": "BoolQ", "rte": "RTE", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
               "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA", "piqa": "PIQA"}


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """One task's scores (fractions in [0, 1]) over its first `n` documents."""

    task: str
    n: int
    acc: float
    acc_stderr: float
    acc_norm: float | None = None  # None where lm-eval does not report it
    acc_norm_stderr: float | None = None
    correct: str = dataclasses.field(default="", repr=False)  # "0110…": acc of each document, in order
    correct_norm: str | None = dataclasses.field(default=None, repr=False)  # the same for acc_norm


@dataclasses.dataclass(frozen=True)
class ZeroShotResult:
    """Per-task results in evaluation order, and what the run took."""

    tasks: dict[str, TaskResult]
    limit: int | None = None
    num_requests: int = 0
    seconds: float = 0.0  # forward passes, the first batch of each shape excluded
    compile_seconds: float = 0.0  # first batch of each shape: compilation (unless cached) and its run
    tokenize_seconds: float = 0.0

    def __getitem__(self, task: str) -> TaskResult:
        return self.tasks[task]

    @property
    def mean(self) -> float:
        """Mean acc over the evaluated tasks."""
        return float(np.mean([r.acc for r in self.tasks.values()]))

    @property
    def suite_mean(self) -> float | None:
        """Mean acc over the 7 tasks of `SUITE` (the papers' headline), or None if any is missing."""
        if not all(t in self.tasks for t in SUITE):
            return None
        return float(np.mean([self.tasks[t].acc for t in SUITE]))

    def to_markdown(self) -> str:
        """A table in percent: task, n, acc ± stderr, acc_norm ± stderr, then the mean row."""
        lines = ["| task | n | acc | acc_norm |", "|---|---:|---:|---:|"]
        for r in self.tasks.values():
            norm = "–" if r.acc_norm is None else _pct(r.acc_norm, r.acc_norm_stderr)
            lines.append(f"| {SHORT_NAMES.get(r.task, r.task)} | {r.n} | {_pct(r.acc, r.acc_stderr)} | {norm} |")
        if self.suite_mean is not None:
            lines.append(f"| **mean (7-task suite)** | | **{100 * self.suite_mean:.2f}** | |")
        if self.suite_mean is None or len(self.tasks) > len(SUITE):
            lines.append(f"| mean ({len(self.tasks)} tasks) | | {100 * self.mean:.2f} | |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": {name: dataclasses.asdict(r) for name, r in self.tasks.items()},
            "suite_mean": self.suite_mean,
            "mean": self.mean,
            "limit": self.limit,
            "num_requests": self.num_requests,
            "seconds": self.seconds,
            "compile_seconds": self.compile_seconds,
            "tokenize_seconds": self.tokenize_seconds,
        }


def zeroshot(
    model: nnx.Module,
    tokenizer: Any,
    tasks: str | Iterable[str] = "suite",
    *,
    limit: int | None = None,
    batch_size: int = 16,
    mesh: Mesh | None = None,
    max_length: int = 2048,
    model_kwargs: Mapping[str, Any] | None = None,
    add_special_tokens: bool | None = None,
) -> ZeroShotResult:
    """Zero-shot acc (and acc_norm) of `model` on `tasks` ("suite", "all", "boolq,rte" or names).

    `limit` keeps each task's first N documents; `max_length` truncates requests from the left;
    `model_kwargs` (arrays, e.g. `compensation=`) go to every forward call; `add_special_tokens=None`
    keeps the tokenizer's default (BOS where it adds one), False matches lm-eval 0.4's causal default.
    """
    names = resolve_tasks(tasks)
    started = time.perf_counter()
    docs, requests, pairs = encoded_requests(tokenizer, names, limit, add_special_tokens)
    tokenize_seconds = time.perf_counter() - started
    log.info("zero-shot: %s; %d requests", ", ".join(f"{n} ({len(docs[n])} docs)" for n in names), len(requests))
    pad_id = getattr(tokenizer, "pad_token_id", None)
    scores = loglikelihood_tokens(
        model, pairs, batch_size=batch_size, mesh=mesh, max_length=max_length, model_kwargs=model_kwargs,
        pad_id=int(pad_id) if pad_id is not None else 0, desc="zero-shot",
    )

    results = task_results(docs, scores.loglik)
    for name, r in results.items():
        log.info("%s: %s", name, _summary(r))
    result = ZeroShotResult(
        tasks=results,
        limit=limit,
        num_requests=len(requests),
        seconds=scores.seconds,
        compile_seconds=scores.compile_seconds,
        tokenize_seconds=tokenize_seconds,
    )
    mean = result.suite_mean if result.suite_mean is not None else result.mean
    log.info("zero-shot mean acc %.4f over %s; %d requests (%d tokens, %d padded) in %.1f s + %.1f s compile "
             "(%d shapes) + %.1f s tokenizing", mean, "the 7-task suite" if result.suite_mean is not None
             else f"{len(names)} tasks", len(requests), scores.tokens, scores.padded_tokens, scores.seconds,
             scores.compile_seconds, len(scores.shapes), tokenize_seconds)
    return result


_encoded_cache: list[tuple[tuple, Any]] = []  # the last (tokenizer, tasks, limit, specials) and their encoding


def encoded_requests(tokenizer: Any, names: Sequence[str], limit: int | None, add_special_tokens: bool | None
                     ) -> tuple[dict[str, list[Doc]], list, list]:
    """(documents per task, requests, their token pairs), read and tokenized once per tokenizer and task set:
    every model scored with the same tokenizer (a recovery table's cells, a pipeline's evaluations) reuses them,
    and a later process reads the pairs back from the disk cache (`token_cache`).
    """
    key = (tuple(names), limit, add_special_tokens)
    if not (_encoded_cache and _encoded_cache[0][0][0] is tokenizer and _encoded_cache[0][0][1:] == key):
        docs = {name: load_docs(name, limit=limit) for name in names}
        requests = [req for name in names for doc in docs[name] for req in doc.requests]
        pairs = token_cache.cached_pairs(
            tokenizer, requests, add_special_tokens,
            lambda: encode_requests(tokenizer, requests, add_special_tokens=add_special_tokens))
        _encoded_cache[:] = [((tokenizer, *key), (docs, requests, pairs))]
    return _encoded_cache[0][1]


def task_results(docs: Mapping[str, Sequence[Doc]], loglik: np.ndarray) -> dict[str, TaskResult]:
    """Every task's metrics from the requests' log-likelihoods, in the order `encoded_requests` lists them (task
    by task, document by document, choice by choice)."""
    results, offset = {}, 0
    for name, task_docs in docs.items():
        lls = []
        for doc in task_docs:
            lls.append(loglik[offset : offset + len(doc.choices)])
            offset += len(doc.choices)
        results[name] = task_result(name, task_docs, lls)
    if offset != len(loglik):
        raise ZeroShotError(f"{len(loglik)} log-likelihoods for {offset} requests.")
    return results


def task_result(task: str, docs: Sequence[Doc], lls: Sequence[np.ndarray]) -> TaskResult:
    """A task's metrics from each document's per-choice log-likelihoods."""
    if len(docs) != len(lls) or not docs:
        raise ZeroShotError(f"{task}: {len(lls)} score lists for {len(docs)} documents.")
    golds = [d.gold for d in docs]
    acc = multiple_choice_correct(lls, golds)
    out = dict(task=task, n=len(docs), acc=float(acc.mean()), acc_stderr=mean_stderr(acc), correct=bits(acc))
    if TASKS[task].acc_norm:
        norm = multiple_choice_correct(lls, golds, [[len(c) for c in d.choices] for d in docs])
        out.update(acc_norm=float(norm.mean()), acc_norm_stderr=mean_stderr(norm), correct_norm=bits(norm))
    return TaskResult(**out)


def bits(correct: np.ndarray) -> str:
    """(docs,) 0/1 -> "0110…", one character per document (compact in JSON, readable by eye)."""
    return "".join("1" if c else "0" for c in np.asarray(correct))


def unbits(text: str) -> np.ndarray:
    """"0110…" -> (docs,) float64 0/1, the inverse of `bits`."""
    return np.frombuffer(text.encode("ascii"), np.uint8).astype(np.float64) - ord("0")


def multiple_choice_correct(
    lls: Sequence[Sequence[float]],
    golds: Sequence[int],
    lengths: Sequence[Sequence[int]] | None = None,
) -> np.ndarray:
    """(docs,) 1.0 where argmax of the log-likelihoods (divided by `lengths` if given) is the gold index.

    As lm-eval: np.argmax, so a tie goes to the first choice.
    """
    correct = np.zeros(len(golds), np.float64)
    for i, (ll, gold) in enumerate(zip(lls, golds, strict=True)):
        scores = np.asarray(ll, np.float64)
        if lengths is not None:
            scores = scores / np.asarray(lengths[i], np.float64)
        correct[i] = float(int(np.argmax(scores)) == gold)
    return correct


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's stderr of a mean: sample standard deviation (n - 1) / sqrt(n); NaN below two values."""
    x = np.asarray(values, np.float64)
    if x.size < 2:
        return math.nan
    return float(x.std(ddof=1) / math.sqrt(x.size))


def _pct(value: float, stderr: float | None) -> str:
    if stderr is None or math.isnan(stderr):
        return f"{100 * value:.2f}"
    return f"{100 * value:.2f} ± {100 * stderr:.2f}"


def _summary(r: TaskResult) -> str:
    norm = "" if r.acc_norm is None else f", acc_norm {r.acc_norm:.4f} ± {r.acc_norm_stderr:.4f}"
    return f"acc {r.acc:.4f} ± {r.acc_stderr:.4f}{norm} (n={r.n})"
