"""Evaluation: perplexity by the pruning papers' protocol and zero-shot accuracy scored like lm-eval."""

from lcc_jax.eval.loglik import LoglikResult, encode_requests, loglikelihood_tokens
from lcc_jax.eval.perplexity import (
    PerplexityError,
    PerplexityResult,
    make_chunks,
    perplexity,
    perplexity_of_tokens,
    tokenize,
)
from lcc_jax.eval.tasks import SUITE, Doc, ZeroShotError, load_docs, resolve_tasks
from lcc_jax.eval.tasks import TASKS as ZEROSHOT_TASKS
from lcc_jax.eval.zeroshot import (
    TaskResult,
    ZeroShotResult,
    mean_stderr,
    multiple_choice_correct,
    task_result,
    zeroshot,
)

__all__ = [
    "SUITE",
    "ZEROSHOT_TASKS",
    "Doc",
    "LoglikResult",
    "PerplexityError",
    "PerplexityResult",
    "TaskResult",
    "ZeroShotError",
    "ZeroShotResult",
    "encode_requests",
    "load_docs",
    "loglikelihood_tokens",
    "make_chunks",
    "mean_stderr",
    "multiple_choice_correct",
    "perplexity",
    "perplexity_of_tokens",
    "resolve_tasks",
    "task_result",
    "tokenize",
    "zeroshot",
]
