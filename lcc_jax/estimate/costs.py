"""This machine's speed, the cost model's constants, and an estimate's stages (`Estimate`)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from lcc_jax.progress import duration

log = logging.getLogger("lcc_jax.estimate")  # one logger for the package


CPU_WARN_SECONDS = 15 * 60  # a CPU job estimated above this gets a warning naming the quick flags
CHARS_PER_TOKEN = 4.3  # English text with a Llama / SmolLM2 / Qwen BPE: 4.2 (WikiText-2) to 4.7 (Alpaca answers)
WIKITEXT2_TEST_CHARS = 1_285_622  # wiki.test.raw, when the file itself is not at hand (the hub)

# Fraction of the measured matmul rate each kind of work reaches, and compile seconds per program shape.
EFFICIENCY = {
    "cpu": {"forward": 0.8, "train": 0.65, "prune": 0.4},
    "gpu": {"forward": 0.35, "train": 0.25, "prune": 0.1},
    "tpu": {"forward": 0.35, "train": 0.25, "prune": 0.1},
}
COMPILE_SECONDS = {"cpu": 1.0, "gpu": 2.0, "tpu": 4.0}  # one forward program; a train step costs TRAIN_COMPILE x
TRAIN_COMPILE = 6.0
TRAIN_FLOPS = 2.5  # a train step / a forward pass: backward to the activations (weights frozen) + attention
REMAT_FLOPS = 1.0  # with remat each layer's forward runs again in the backward pass
LOAD_BYTES_PER_SECOND = 1.5e8  # read, convert, place (safetensors on a local disk)
SAVE_BYTES_PER_SECOND = 2.5e8  # Orbax or safetensors, written once


@dataclasses.dataclass(frozen=True)
class Machine:
    """Where the job runs: backend, devices, cores, and the matmul rate measured on them in the job's dtype."""

    backend: str
    devices: int
    cores: int
    flops: float  # FLOP/s of a model-sized matmul in `dtype`, all devices together
    dtype: str = "fp32"  # "fp32" or "bf16": the job's weights, so its matmuls' speed (bf16 tensor cores on a GPU)

    @classmethod
    def measure(cls, devices: int | None = None, seconds: float = 0.3, dtype: str = "fp32") -> Machine:
        """Time a (512 x 1024) @ (1024 x 2048) matmul (4096^3 on an accelerator) in `dtype` on the default device
        for `seconds` (the median run: a moment of load from other programs moves it little); an accelerator's
        rate is multiplied by `devices` (default: all), a CPU's is not (its devices share the same cores).
        Measured once per process and dtype."""
        if dtype not in MATMUL_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(MATMUL_DTYPES)}, not {dtype!r}")
        count = jax.device_count() if devices is None else devices
        backend, rate = _matmul_rate(seconds, dtype)
        return cls(backend, count, _cores(), rate * (count if backend != "cpu" else 1), dtype)

    def describe(self) -> str:
        where = f"{self.cores} CPU cores" if self.backend == "cpu" else f"{self.devices} {self.backend.upper()}(s)"
        return f"{where}, {self.flops / 1e9:.0f} GFLOP/s measured ({self.dtype})"


MATMUL_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


@functools.cache
def _matmul_rate(seconds: float, dtype: str = "fp32") -> tuple[str, float]:
    """(backend, FLOP/s) of the default device: the median of timed matmuls in `dtype`.

    A bf16 job timed against the fp32 rate was over-estimated several-fold on a GPU (Qwen2.5-1.5B's recovery cells
    on an H200, 2026-12-07: 390-496 s estimated, 63-142 s measured), where bf16 runs on faster tensor cores."""
    backend = jax.default_backend()
    n, k, m = (512, 1024, 2048) if backend == "cpu" else (4096, 4096, 4096)
    a, b = jnp.ones((n, k), MATMUL_DTYPES[dtype]), jnp.ones((k, m), MATMUL_DTYPES[dtype])
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    times, start = [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return backend, 2.0 * n * k * m / float(np.median(times))


@dataclasses.dataclass(frozen=True)
class StageEstimate:
    name: str
    seconds: float
    tokens: int = 0  # tokens the stage runs through the model (0: no model work)
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Estimate:
    """The stages of one job, in order, with their estimated seconds."""

    job: str
    machine: Machine
    stages: tuple[StageEstimate, ...]

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def stages_seconds(self) -> list[tuple[str, float]]:
        return [(s.name, s.seconds) for s in self.stages]

    def log(self, logger: logging.Logger | None = None) -> None:
        """One line: the machine, the total, every stage."""
        logger = logger or log
        parts = ", ".join(f"{s.name} {duration(s.seconds)}" for s in self.stages if s.seconds >= 0.5)
        tokens = sum(s.tokens for s in self.stages)
        logger.info("estimate for %s on %s: about %s in all (%s tokens through the model): %s", self.job,
                    self.machine.describe(), duration(self.seconds), f"{tokens:,}", parts)

    def warn_if_long(self, hint: str, logger: logging.Logger | None = None, limit: float = CPU_WARN_SECONDS) -> bool:
        """On a CPU, warn when the estimate exceeds `limit` seconds, naming what makes a small run (`hint`)."""
        logger = logger or log
        if self.machine.backend != "cpu" or self.seconds <= limit:
            return False
        top = sorted(self.stages, key=lambda s: -s.seconds)[:3]
        logger.warning("this %s is estimated at about %s on this CPU (%d cores; mostly %s). For a faithful small "
                       "run of the whole pipeline in a few minutes use %s; on a GPU or TPU the full run is much "
                       "faster.", self.job, duration(self.seconds), self.machine.cores,
                       ", ".join(f"{s.name} {duration(s.seconds)}" for s in top), hint)
        return True

    def to_dict(self) -> dict:
        return {"job": self.job, "machine": dataclasses.asdict(self.machine), "seconds": round(self.seconds, 1),
                "stages": {s.name: round(s.seconds, 1) for s in self.stages}}


# ------------------------------------------------------------------------------------------ costs


@dataclasses.dataclass(frozen=True)
class Costs:
    """FLOPs per token of one model on one machine, and seconds for the kinds of work the stages do."""

    config: object  # lcc_jax.config.ModelConfig
    machine: Machine

    @property
    def params(self) -> int:
        c = self.config
        attention = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)  # q, o; k, v
        layer = attention + 3 * c.hidden_size * c.intermediate_size
        embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
        return c.num_layers * layer + embed

    def flops_per_token(self, context: int, logits: bool = True) -> float:
        """Forward FLOPs of one token: 2 per weight, attention over half the context (causal), the lm_head."""
        c = self.config
        weights = self.params - c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
        attention = c.num_layers * 2 * c.num_heads * c.head_dim * context  # QK^T and AV, 2 FLOPs each, context/2 keys
        return 2.0 * weights + attention + (2.0 * c.vocab_size * c.hidden_size if logits else 0.0)

    def _rate(self, kind: str) -> float:
        return self.machine.flops * EFFICIENCY.get(self.machine.backend, EFFICIENCY["gpu"])[kind]

    def compile_seconds(self, programs: int, train: bool = False) -> float:
        per = COMPILE_SECONDS.get(self.machine.backend, 2.0) * (TRAIN_COMPILE if train else 1.0)
        return per * programs

    def forward(self, shapes: Iterable[tuple[int, int]], logits: bool = True) -> tuple[float, int]:
        """(seconds, tokens) of forward passes over padded (batch, length) shapes, compiles included."""
        shapes = list(shapes)
        flops = sum(b * n * self.flops_per_token(n, logits) for b, n in shapes)
        tokens = sum(b * n for b, n in shapes)
        return flops / self._rate("forward") + self.compile_seconds(len(set(shapes))), tokens

    def train(self, shapes: Iterable[tuple[int, int]], remat: bool = False, max_programs: int = 6) -> tuple[float, int]:
        """(seconds, tokens) of train steps (`fit` compiles at most six packed shapes)."""
        shapes = list(shapes)
        flops = (TRAIN_FLOPS + (REMAT_FLOPS if remat else 0.0)) * sum(b * n * self.flops_per_token(n) for b, n in shapes)
        tokens = sum(b * n for b, n in shapes)
        programs = min(len(set(shapes)), max_programs)
        return flops / self._rate("train") + self.compile_seconds(programs, train=True), tokens

    def prune(self, method: str, tokens: int, seqlen: int) -> float:
        """Sequential layer-by-layer calibration (each layer's inputs, then its pruned outputs) and the masks."""
        if method == "magnitude":
            return 1.0 + self.params * 2e-8
        passes = 3.0 if method == "sparsegpt" else 2.0
        flops = passes * tokens * self.flops_per_token(seqlen, logits=False)
        return flops / self._rate("prune") + self.compile_seconds(4) + self.params * 5e-8

    def load(self, bytes_per_param: int = 4) -> float:
        return 1.0 + self.params * bytes_per_param / LOAD_BYTES_PER_SECOND

    def save(self, copies: int = 1, bytes_per_param: int = 4) -> float:
        return 0.5 + copies * self.params * bytes_per_param / SAVE_BYTES_PER_SECOND


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
