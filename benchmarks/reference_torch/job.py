"""The whole RestoreLCC job, reference-style, run on a fraction of its work and extrapolated.

Phases, as `obtain_main_vecs` and the Trainer run them:
  capture_dense   q, q+r⁺, q+r⁻ of N probing samples through the dense model, one at a time
  capture_pruned  q through the pruned model, one at a time
  heads           per head: SVD of ΔZ, probe-time component, logistic probe (host, fp32)
  train           epochs · ⌈samples / batch⌉ AdamW steps on β, b of the top-k heads
With `fraction` f < 1 each phase runs ⌈f · units⌉ of its units at full size (a head's SVD and probe
use all N rows, tiled from the captured ones). A phase's full time is extrapolated as its first
unit plus the rest scaled to the full count, so one-off warm-up is not multiplied.
Not timed: building the model and pruning it (the reference loads a pruned checkpoint from disk;
here the dense model is magnitude-pruned in place), per-epoch evaluation, saving.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import transformers

from . import data
from .batching import training_batch
from .capture import capture_reference
from .components import head_score
from .hooks import Compensation
from .shapes import Shape
from .timing import synchronize
from .train_step import make_optimizer, random_basis, train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """The paper's general-recovery job: 1,000 probing samples, top 25 % heads, 2,000 × 3 epochs at batch 8."""

    probe_samples: int = 1000
    train_samples: int = 2000
    epochs: int = 3
    batch_size: int = 8
    top_k: float = 0.25
    max_len: int = 500
    probe_max_len: int = 512
    fraction: float = 1.0
    seed: int = 0


@dataclasses.dataclass
class Phase:
    """Timing of one phase: measured seconds over `units` of `full_units`, and its first unit alone."""

    name: str
    full_units: int
    units: int = 0
    seconds: float = 0.0
    first_seconds: float = 0.0

    def extrapolated_seconds(self) -> float:
        if self.units <= 1 or self.units >= self.full_units:
            return self.seconds * self.full_units / max(self.units, 1)
        rest = (self.seconds - self.first_seconds) / (self.units - 1)
        return self.first_seconds + rest * (self.full_units - 1)

    def as_dict(self) -> dict[str, float | int]:
        return {"seconds": self.seconds, "units": self.units, "full_units": self.full_units,
                "first_unit_seconds": self.first_seconds, "extrapolated_seconds": self.extrapolated_seconds()}


def _run(phase: Phase, items: Sequence[Any], work: Callable[[Sequence[Any]], Any], device: torch.device) -> list[Any]:
    """Runs `work` on the first item, then on the rest, timing both into `phase`."""
    results = []
    for part in (items[:1], items[1:]):
        if not len(part):
            continue
        synchronize(device)
        start = time.perf_counter()
        results.append(work(part))
        synchronize(device)
        elapsed = time.perf_counter() - start
        phase.first_seconds = phase.first_seconds or elapsed
        phase.seconds += elapsed
    phase.units += len(items)
    log.info("job %-15s %d/%d units in %.2f s (full: %.1f s extrapolated)", phase.name, phase.units,
             phase.full_units, phase.seconds, phase.extrapolated_seconds())
    return results


def _count(fraction: float, full: int) -> int:
    return min(full, max(1, math.ceil(fraction * full)))


def epoch_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Sample indices of every step: a fresh shuffle per epoch, the last batch of an epoch possibly short."""
    out = []
    for epoch in range(epochs):
        order = np.random.default_rng(seed + epoch).permutation(n)
        out += [order[i: i + batch_size] for i in range(0, n, batch_size)]
    return out


@torch.no_grad()
def magnitude_prune_(model: transformers.LlamaForCausalLM, sparsity: float = 0.5) -> None:
    """Zeros the smallest |W| of every output row of every decoder linear (stands in for loading a pruned model)."""
    for layer in model.model.layers:
        for linear in layer.modules():
            if isinstance(linear, torch.nn.Linear):
                w = linear.weight.data
                drop = torch.topk(w.abs(), int(w.shape[1] * sparsity), dim=1, largest=False)[1]
                w.scatter_(1, drop, 0)


def run_job(model: transformers.LlamaForCausalLM, shape: Shape, device: torch.device, config: JobConfig
            ) -> dict[str, Phase]:
    """Runs the job's phases on `model` (dense on entry, pruned on exit); returns their timings."""
    n_probe = _count(config.fraction, config.probe_samples)
    steps_per_epoch = math.ceil(config.train_samples / config.batch_size)
    phases = {name: Phase(name, full) for name, full in (
        ("capture_dense", 3 * config.probe_samples), ("capture_pruned", config.probe_samples),
        ("heads", shape.total_heads), ("train", config.epochs * steps_per_epoch))}

    queries, positives, negatives = data.probing_triples(config.probe_samples, shape.vocab_size, config.seed,
                                                         config.probe_max_len)
    capture = lambda seqs: capture_reference(model, seqs, device)  # noqa: E731
    dense = [torch.cat(_run(phases["capture_dense"], s[:n_probe], capture, device))
             for s in (queries, positives, negatives)]
    magnitude_prune_(model)
    pruned = torch.cat(_run(phases["capture_pruned"], queries[:n_probe], capture, device))

    rows = torch.arange(config.probe_samples) % n_probe  # full-size per-head work, tiled from captured rows
    z_dense, z_pos, z_neg, z_pruned = (z[rows] for z in (*dense, pruned))
    generator = torch.Generator().manual_seed(config.seed)
    bases = random_basis(shape.total_heads, shape.head_dim, generator)
    scores = torch.full((shape.total_heads,), -1.0)

    def score_heads(heads: Sequence[int]) -> None:
        for h in heads:
            scores[h], bases[h] = head_score(z_dense[:, h], z_pruned[:, h], z_pos[:, h], z_neg[:, h], generator)

    _run(phases["heads"], list(range(_count(config.fraction, shape.total_heads))), score_heads, device)

    k = max(1, round(config.top_k * shape.total_heads))
    heads = torch.topk(scores, k).indices.tolist()
    compensation = Compensation(heads, bases[heads].to(device), shape.num_heads, generator=generator)
    compensation.attach(model)
    optimizer, scheduler = make_optimizer(compensation, phases["train"].full_units)
    samples = data.instruction_samples(config.train_samples, shape.vocab_size, config.seed + 1, config.max_len)
    batches = epoch_batches(config.train_samples, config.batch_size, config.epochs, config.seed)

    def steps(chosen: Sequence[np.ndarray]) -> None:
        for index in chosen:
            train_step(model, compensation, optimizer, scheduler, training_batch([samples[j] for j in index]), device)

    try:
        with torch.enable_grad():
            _run(phases["train"], batches[: _count(config.fraction, len(batches))], steps, device)
    finally:
        compensation.detach_hooks()
    return phases
