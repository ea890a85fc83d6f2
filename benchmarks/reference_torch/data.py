"""Synthetic token sequences with Alpaca-like lengths, deterministic from a seed (numpy only).

The benchmark machine has no data sets, so lengths follow fits to the 2,000 Alpaca samples
RestoreLCC trains on (≈3.6 characters per Llama token): prompts log-normal with median 29 tokens
(95th percentile 64), responses log-normal with median 130 (95th percentile 528). Token ids are
uniform in [3, vocab): ids 0–2 stay free for pad, bos and eos. Only numpy is used, so the lcc_jax
benchmarks can import this module and run on the very same sequences.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PROMPT_MEDIAN, PROMPT_SIGMA = 29.0, 0.48
RESPONSE_MEDIAN, RESPONSE_SIGMA = 130.0, 0.85
FIRST_TOKEN = 3


@dataclasses.dataclass(frozen=True)
class Sample:
    """One instruction sample: token ids and how many of them (the leading ones) are the prompt."""

    ids: np.ndarray  # (T,) int64
    prompt_len: int

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _lognormal(rng: np.random.Generator, n: int, median: float, sigma: float, low: int, high: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), low, high).astype(np.int64)


def _tokens(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    return rng.integers(FIRST_TOKEN, vocab, size=n, dtype=np.int64)


def capture_lengths(n: int, seed: int, low: int = 50, high: int = 150) -> np.ndarray:
    """Lengths for the capture benchmark: uniform in [low, high] (mean 100: Alpaca prompts' typical length)."""
    return np.random.default_rng(seed).integers(low, high + 1, size=n)


def token_sequences(lengths: np.ndarray, vocab: int, seed: int) -> list[np.ndarray]:
    """One random id sequence per length."""
    rng = np.random.default_rng(seed)
    return [_tokens(rng, int(t), vocab) for t in lengths]


def training_samples(n: int, vocab: int, seed: int, low: int = 120, high: int = 500) -> list[Sample]:
    """Training-step samples: total length uniform in [low, high], an Alpaca-like prompt, the rest response."""
    rng = np.random.default_rng(seed)
    totals = rng.integers(low, high + 1, size=n)
    prompts = np.minimum(_lognormal(rng, n, PROMPT_MEDIAN, PROMPT_SIGMA, 8, 256), totals // 2)
    return [Sample(_tokens(rng, int(t), vocab), int(p)) for t, p in zip(totals, prompts)]


def instruction_samples(n: int, vocab: int, seed: int, max_len: int = 500) -> list[Sample]:
    """Alpaca-like samples for the whole job: prompt + response, truncated to `max_len` tokens."""
    rng = np.random.default_rng(seed)
    prompts = _lognormal(rng, n, PROMPT_MEDIAN, PROMPT_SIGMA, 8, 256)
    responses = _lognormal(rng, n, RESPONSE_MEDIAN, RESPONSE_SIGMA, 1, 1024)
    out = []
    for p, r in zip(prompts, responses):
        total = int(min(p + r, max_len))
        out.append(Sample(_tokens(rng, total, vocab), int(min(p, total - 1))))
    return out


def probing_triples(n: int, vocab: int, seed: int, max_len: int = 512
                    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """RestoreLCC probing inputs: prompts q, q + r⁺ and q + r⁻ (r⁻ is another sample's response).

    As the reference, each text is truncated to `max_len` tokens (its tokenizer call uses 512).
    """
    samples = instruction_samples(n, vocab, seed, max_len=10**9)
    queries = [s.ids[: s.prompt_len][:max_len] for s in samples]
    responses = [s.ids[s.prompt_len:] for s in samples]
    positives = [np.concatenate([q, r])[:max_len] for q, r in zip(queries, responses)]
    negatives = [np.concatenate([q, responses[(i + 1) % n]])[:max_len] for i, q in enumerate(queries)]
    return queries, positives, negatives


def calibration_tokens(nsamples: int, seqlen: int, vocab: int, seed: int) -> np.ndarray:
    """(nsamples, seqlen) random ids standing in for Wanda/SparseGPT's C4 calibration windows."""
    return _tokens(np.random.default_rng(seed), nsamples * seqlen, vocab).reshape(nsamples, seqlen)
