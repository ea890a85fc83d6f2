"""Evaluation: perplexity by the pruning papers' protocol (zero-shot scoring and reports to come)."""

from lcc_jax.eval.perplexity import (
    PerplexityError,
    PerplexityResult,
    make_chunks,
    perplexity,
    perplexity_of_tokens,
    tokenize,
)

__all__ = [
    "PerplexityError",
    "PerplexityResult",
    "make_chunks",
    "perplexity",
    "perplexity_of_tokens",
    "tokenize",
]
