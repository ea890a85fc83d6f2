"""One batched runner for every "run this jitted function over many sequences" in lcc_jax.

Activation capture, perplexity and zero-shot scoring all do the same four things, here once:

1. **Buckets.** Sequences are padded to a length from a fixed geometric ladder (`ladder`: multiples of
   16, each about `growth` x the last), so a jitted function compiles once per rung, not per batch.
   `choose_buckets` picks the growth for a set of lengths by cost: padded tokens x the device's seconds
   per token + shapes x its seconds per compile. On a CPU a token is dear and a fine ladder wins; on an
   accelerator a compile costs as much as a million tokens and a coarse ladder wins.
   `benchmarks/shapes.py` measures the trade (benchmarks/RESULTS.md, "Compiled shapes").
2. **Sharding.** Batch rows are split over the mesh's batch axes (`batch_rows` rounds the batch up to
   their multiple); every array of a batch is placed with `device.row_sharding(mesh)` (rows split, the rest
   replicated).
3. **One compile per shape.** `Runner.compile` lowers and compiles the step for every batch signature
   ahead of time, new ones concurrently (`device.Executables`: threads under the mesh), and keeps the
   executables across calls and runners with the same step, weights' layout and sharding (dense and
   pruned models, the pipeline's three perplexities). A fused-attention compile refused on GPU/TPU falls
   back to XLA attention (`device.xla_fallback`).
4. **Prefetch.** `Runner.run` places batch i+1 on the device(s) from a background thread while batch i
   runs (`device.prefetch_with`), and fetches the outputs of batch i-1 (a collective with several
   processes, in the same order on every process) while batch i runs.

The pieces of 2-4 live in `lcc_jax.data.device`, shared with the trainer's compiled train step.

A step is a module-level function `fn(model, arrays, model_kwargs) -> pytree of (batch, ...) arrays`;
`arrays` is the dict of (batch, ...) host arrays of one batch, `model_kwargs` (e.g. `compensation=`) is the
same for every batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lcc_jax.data.device import Executables, abstract, layout, prefetch_with, row_sharding, row_shards, xla_fallback
from lcc_jax.distributed import gather_to_host
from lcc_jax.models.attention import attention_implementation
from lcc_jax.progress import bar

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------- buckets

MULTIPLE = 16  # every padded length is a multiple of this
GROWTHS = (1.25, 1.5, 2.0)  # ladders choose_buckets weighs: 13, 9 and 7 shapes on SmolLM2's zero-shot suite
# What a compiled shape and a padded token cost, by backend (seconds), for choose_buckets. CPU: SmolLM2-135M
# on a 2-core CPU, measured by benchmarks/shapes.py (benchmarks/RESULTS.md, "Compiled shapes": ~1 s a shape,
# 1.2-1.9 ms a token, so the finest ladder wins there). GPU/TPU: SmolLM2's zero-shot suite on an H200 (12
# shapes compiled in ~65 s, 2.2 s for ~1.1 M padded tokens), where the coarsest ladder wins.
SHAPE_SECONDS = {"cpu": 1.0, "gpu": 5.4, "tpu": 5.4}
TOKEN_SECONDS = {"cpu": 1.5e-3, "gpu": 2e-6, "tpu": 2e-6}


def ladder(longest: int, multiple: int = MULTIPLE, growth: float = 1.25) -> tuple[int, ...]:
    """Padded lengths: multiples of `multiple`, each about `growth` x the last, the top one covering `longest`.

    growth 1.25: 16, 32, 48, 64, 80, 112, 144, 192, 240, 304, 384, 480, 608, 768, 960, 1200, 1504, 1888,
    2048 (at most ~25 % padding per row, 19 shapes up to 2,048 tokens); growth 2: powers of two.
    """
    if multiple < 1 or growth <= 1:
        raise ValueError(f"multiple must be positive and growth above 1, not {multiple} and {growth}.")
    top = -(-max(int(longest), 1) // multiple) * multiple
    out = [multiple]
    while out[-1] < top:
        grown = -(-int(out[-1] * growth) // multiple) * multiple
        out.append(min(max(out[-1] + multiple, grown), top))
    return tuple(out)


def padded_shapes(lengths: Sequence[int], batch: int, buckets: Sequence[int]) -> list[tuple[int, int]]:
    """(batch, bucket) of every batch when `lengths` go longest first, `batch` rows a batch, as `make_batches`
    cuts them (order="length")."""
    order = sorted((int(n) for n in lengths), reverse=True)
    buckets = sorted(buckets)
    return [(batch, next((b for b in buckets if b >= order[start]), buckets[-1]))
            for start in range(0, len(order), batch)]


@dataclasses.dataclass(frozen=True)
class ShapeCost:
    """What one bucket ladder costs a set of lengths."""

    buckets: tuple[int, ...]
    shapes: int  # distinct (batch, seq) compiled
    tokens: int  # real tokens
    padded_tokens: int  # tokens computed: padding and filler rows included

    @property
    def padding(self) -> float:
        """Padded tokens per real token (1.0: no padding)."""
        return self.padded_tokens / max(self.tokens, 1)

    def seconds(self, shape_seconds: float, token_seconds: float) -> float:
        """Estimated seconds: every shape compiled once, every padded token computed."""
        return self.shapes * shape_seconds + self.padded_tokens * token_seconds


def shape_cost(lengths: Sequence[int], batch: int, buckets: Sequence[int]) -> ShapeCost:
    shapes = padded_shapes(lengths, batch, buckets)
    return ShapeCost(tuple(buckets), len(set(shapes)), int(sum(lengths)), int(sum(b * s for b, s in shapes)))


def device_costs(backend: str | None = None) -> tuple[float, float]:
    """(seconds per compiled shape, seconds per padded token) on `backend` (default: JAX's)."""
    backend = backend or jax.default_backend()
    return SHAPE_SECONDS.get(backend, SHAPE_SECONDS["gpu"]), TOKEN_SECONDS.get(backend, TOKEN_SECONDS["gpu"])


def choose_buckets(lengths: Sequence[int], batch: int, *, backend: str | None = None,
                   costs: tuple[float, float] | None = None, growths: Sequence[float] = GROWTHS,
                   multiple: int = MULTIPLE) -> tuple[int, ...]:
    """The ladder (of `growths`) with the least estimated seconds for these lengths, `batch` rows a batch.

    `costs` = (seconds per compiled shape, seconds per padded token); default: `backend`'s (default JAX's)
    from SHAPE_SECONDS and TOKEN_SECONDS. Ties go to fewer shapes.
    """
    if not len(lengths):
        raise ValueError("no lengths to bucket.")
    costs = costs or device_costs(backend)
    options = [shape_cost(lengths, batch, ladder(int(max(lengths)), multiple, g)) for g in growths]
    return min(options, key=lambda c: (c.seconds(*costs), c.shapes)).buckets


# ---------------------------------------------------------------------------------- sharding


def batch_rows(batch_size: int | None, mesh: Mesh | None, error: type[Exception] = ValueError) -> int:
    """`batch_size` rounded up to split evenly over the mesh's batch shards (None: one row per shard)."""
    shards = row_shards(mesh)
    if batch_size is None:
        return shards
    if batch_size < 1:
        raise error(f"batch_size must be positive, not {batch_size}.")
    if batch_size % shards:
        rounded = -(-batch_size // shards) * shards
        log.warning("batch_size %d does not split over %d batch shards; using %d", batch_size, shards, rounded)
        return rounded
    return batch_size


# ---------------------------------------------------------------------------------- compile and run

Step = Callable[[nnx.Module, Mapping[str, jax.Array], Mapping[str, Any]], Any]
_COMPILED = Executables()  # ((jitted step, weights' layout, kwargs' layout, sharding), signature) -> executable


@dataclasses.dataclass
class RunStats:
    """What one `Runner.run` took."""

    seconds: float = 0.0  # the batches, compilation excluded
    compile_seconds: float = 0.0  # shapes compiled for this run (0 when all were cached)
    compiled: int = 0  # shapes compiled for this run
    shapes: tuple[tuple[int, ...], ...] = ()  # (batch, seq) of every distinct batch, in first-run order
    tokens: int = 0  # elements of the batches' first array (tokens): padding and filler rows included


def _signature(arrays: Mapping[str, Any]) -> tuple:
    return tuple((k, tuple(np.shape(v)), str(np.asarray(v).dtype if not hasattr(v, "dtype") else v.dtype))
                 for k, v in sorted(arrays.items()))


@functools.lru_cache(maxsize=32)
def _jitted(graphdef: nnx.GraphDef, fn: Step, attention: str | None = None):
    def run(state, arrays, model_kwargs):
        with attention_implementation(attention):
            return fn(nnx.merge(graphdef, state), arrays, model_kwargs)

    return jax.jit(run)


class Runner:
    """`fn` over batches of one model: compiled once per batch shape, rows split over `mesh`, inputs prefetched.

    `model_kwargs` (arrays, e.g. `compensation=`) reach every call of `fn`.
    """

    def __init__(self, model: nnx.Module, fn: Step, *, mesh: Mesh | None = None,
                 model_kwargs: Mapping[str, Any] | None = None, workers: int = 8):
        self.graphdef, self.state = nnx.split(model)
        self.fn, self.mesh, self.workers = fn, mesh, workers
        self.model_kwargs = dict(model_kwargs or {})
        self.sharding = row_sharding(mesh)  # rows split, the rest whole
        self.attention: str | None = None
        self._executables: dict[tuple, Any] = {}

    def _mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def compile(self, examples: Iterable[Mapping[str, Any]]) -> tuple[int, float]:
        """Compile `fn` for the signature of every batch in `examples` not compiled yet: (new shapes, seconds)."""
        signatures = list(dict.fromkeys(_signature(a) for a in examples))

        def attempt(attention: str | None) -> tuple[int, float]:
            self.attention = attention
            return self._compile(signatures)

        return xla_fallback(attempt, getattr(self.fn, "__name__", "step"), self.attention)

    def _compile(self, signatures: list[tuple]) -> tuple[int, float]:
        step = _jitted(self.graphdef, self.fn, self.attention)
        state, kwargs = abstract(self.state), abstract(self.model_kwargs)

        def lower_args(signature: tuple) -> tuple:
            arrays = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.sharding) for k, shape, dtype in signature}
            return state, arrays, kwargs

        key = (step, layout(self.state), layout(self.model_kwargs), self.sharding)
        executables, todo, seconds = _COMPILED.compile(step, signatures, lower_args, key=key, mesh=self.mesh,
                                                       workers=self.workers)
        if todo:
            log.info("compiled %s for %d batch shape(s) %s in %.1f s", getattr(self.fn, "__name__", "step"),
                     len(todo), [dict((k, s) for k, s, _ in sig).get("tokens") for sig in todo], seconds)
        self._executables.update(executables)
        return len(todo), seconds

    def run(self, batches: Sequence[tuple[Any, Mapping[str, np.ndarray]]], collect: Callable[[Any, Any], int],
            *, prefetch_size: int = 2, desc: str = "", total: int | None = None, unit: str = "seq") -> RunStats:
        """`fn` on every (meta, host arrays) of `batches`, in order; `collect(meta, host outputs)` gets each result
        (one batch behind the one running) and returns how many items it finished (for the progress bar)."""
        batches = list(batches)
        stats = RunStats()
        if not batches:
            return stats
        with self._mesh():
            stats.compiled, stats.compile_seconds = self.compile(a for _, a in batches)
            stats.shapes = tuple(dict.fromkeys(tuple(np.shape(next(iter(a.values())))) for _, a in batches))
            stats.tokens = int(sum(np.size(next(iter(a.values()))) for _, a in batches))
            started = time.perf_counter()
            with bar(total=total, desc=desc or "run", unit=unit) as progress:
                pending = None  # fetch batch i-1 while batch i runs
                placed = prefetch_with((((meta, a), a) for meta, a in batches), self.sharding, prefetch_size)
                for (meta, arrays), device_arrays in placed:
                    out = self._executables[_signature(arrays)](self.state, device_arrays, self.model_kwargs)
                    if pending is not None:
                        progress.update(collect(pending[0], gather_to_host(pending[1])))
                    pending = (meta, out)
                progress.update(collect(pending[0], gather_to_host(pending[1])))
            stats.seconds = time.perf_counter() - started
        return stats
