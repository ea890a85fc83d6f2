"""Benchmark settings: one frozen dataclass, the single source of the command line's defaults.

The defaults keep every stage on LLaMA-7B within a few minutes of an H200.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What each stage measures and on how much work."""

    shape: str = "llama2-7b"
    stages: tuple[str, ...] = ("capture", "train", "wanda", "sparsegpt", "job")
    device: str = "cuda"
    seed: int = 0
    # capture: one sample at a time (reference) and right-padded batches
    capture_samples: int = 100
    capture_batched_samples: int = 320
    capture_batch: int = 32
    capture_min_len: int = 50
    capture_max_len: int = 150
    capture_warmup: int = 3
    # one compensation training step
    train_steps: int = 20
    train_warmup: int = 3
    train_batch: int = 8
    train_min_len: int = 120
    train_max_len: int = 500
    top_k: float = 0.25
    # Wanda / SparseGPT calibration: nsamples windows of seqlen tokens
    nsamples: int = 32
    seqlen: int = 2048
    sparsegpt_layer: int = 0
    layer_patterns: tuple[str, ...] = ("unstructured", "2:4")
    model_patterns: tuple[str, ...] = ("unstructured",)
    # the whole job, run on this fraction of its work
    fraction: float = 0.05
    probe_samples: int = 1000
    job_train_samples: int = 2000
    job_epochs: int = 3
    job_max_len: int = 500
    probe_max_len: int = 512
    peak_matmul_size: int = 8192


def parse_pattern(pattern: str) -> tuple[int, int]:
    """(prune_n, prune_m): "unstructured" is (0, 0), "2:4" is (2, 4)."""
    if pattern == "unstructured":
        return 0, 0
    n, m = (int(x) for x in pattern.split(":"))
    return n, m
