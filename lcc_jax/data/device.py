"""What every batched loop on the device(s) shares: executables compiled ahead of time, rows over the mesh, prefetch.

`runner.Runner` (capture, perplexity, zero-shot) and the trainer's `StepTable` (`fit`, `fit_grid`) build on these
pieces; a train step donates its parameters and optimizer state, so it is no `Runner.run` map, but it compiles,
places and prefetches its batches the same way:

* **Compile ahead.** `Executables.compile` lowers and compiles a jitted function for every new batch
  signature at once, in threads under the mesh (XLA compiles outside the GIL; `map_under_mesh`), and keeps
  the executables across calls keyed by (function and argument layout, signature). `xla_fallback` retries a
  compile with XLA attention where GPU/TPU refuse a fused attention kernel (that shows only when compiling).
* **Rows over the mesh.** `row_sharding` splits a batch's rows over the mesh's batch axes (after `leading`
  whole axes: the trainer's micro-batch axis), the rest whole; `row_shards` says into how many pieces and
  `check_rows` refuses rows that do not split.
* **Prefetch.** `prefetch_with` places the arrays of (meta, arrays) pairs on the device(s) from a background
  thread (`batching.prefetch`) while the caller computes, each meta handed back with its arrays.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcc_jax.data.batching import prefetch
from lcc_jax.models.attention import compile_error_summary
from lcc_jax.sharding import DEFAULT_RULES, batch_sharding, batch_shards, map_under_mesh

log = logging.getLogger(__name__)

T = TypeVar("T")

# ---------------------------------------------------------------------------------- compile ahead


def abstract(tree: Any) -> Any:
    """`tree` as ShapeDtypeStructs with the arrays' shardings: what `lower` needs, without holding the buffers."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def layout(tree: Any) -> tuple:
    """(structure, (shape, dtype, sharding) per leaf): what of an argument a compiled program depends on."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(x.shape), str(x.dtype), getattr(x, "sharding", None)) for x in leaves)


class Executables:
    """Compiled programs kept across calls, keyed by (function and argument layout, batch signature).

    At most `limit`; past it the oldest go first. Safe across threads: a program another thread is compiling
    is waited for, not compiled twice (`train.precompile_fit` compiles the train step while capture runs).
    """

    def __init__(self, limit: int = 64):
        self.limit = limit
        self._kept: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self._in_flight: dict[tuple, concurrent.futures.Future] = {}

    def compile(self, jitted, signatures: Sequence[Hashable], lower_args: Callable[[Hashable], tuple], *,
                key: Hashable, mesh: Mesh | None, workers: int = 8) -> tuple[dict[Hashable, Any], list, float]:
        """({signature: executable} for every signature, the signatures compiled now, seconds compiling).

        Executables kept under (key, signature) are reused; the rest are compiled concurrently under `mesh`,
        `jitted.lower(*lower_args(signature)).compile()`. `key` must name everything but the signature that
        changes the program: the function, its arguments' layout, the batch sharding.
        """
        signatures = list(dict.fromkeys(signatures))
        started = time.perf_counter()
        with self._lock:
            out = {s: self._kept[(key, s)] for s in signatures if (key, s) in self._kept}
            waiting = {s: self._in_flight[(key, s)] for s in signatures if s not in out and (key, s) in self._in_flight}
            todo = [s for s in signatures if s not in out and s not in waiting]
            mine = {s: self._in_flight.setdefault((key, s), concurrent.futures.Future()) for s in todo}
        try:
            if todo:
                compiled = map_under_mesh(lambda s: jitted.lower(*lower_args(s)).compile(), todo, mesh, workers)
                with self._lock:
                    for signature, executable in zip(todo, compiled):
                        if len(self._kept) >= self.limit:
                            self._kept.pop(next(iter(self._kept)))
                        self._kept[(key, signature)] = out[signature] = executable
                        mine[signature].set_result(executable)
        except BaseException as e:
            for future in mine.values():
                if not future.done():
                    future.set_exception(e)
            raise
        finally:
            with self._lock:
                for signature in todo:
                    self._in_flight.pop((key, signature), None)
        for signature, future in waiting.items():
            out[signature] = future.result()  # another thread's compile; its error is raised here too
        return {s: out[s] for s in signatures}, todo, time.perf_counter() - started


def xla_fallback(compile: Callable[[str | None], T], what: str, attention: str | None = None) -> T:
    """`compile(attention)`; where GPU/TPU refuse it (cuDNN or splash refusing a fused attention shows only when
    compiling), `compile("xla")` instead, raising the first error if that fails too."""
    try:
        return compile(attention)
    except Exception as e:
        if jax.default_backend() not in ("gpu", "tpu") or attention == "xla" or _shutting_down(e):
            raise
        log.warning("compiling %s failed (%s); retrying with XLA attention instead of the fused kernel", what,
                    compile_error_summary(e))
        try:
            return compile("xla")
        except Exception:
            raise e from None


def _shutting_down(error: Exception) -> bool:
    """A compile stopped because the process is exiting (a thread pool refusing work after an interrupt): not the
    kernel's fault, so no retry with XLA attention (which would fail the same way, after a misleading warning)."""
    return isinstance(error, RuntimeError) and "interpreter shutdown" in str(error)


# ---------------------------------------------------------------------------------- rows over the mesh


def row_shards(mesh: Mesh | None) -> int:
    """How many pieces the mesh cuts a batch's rows into (1 without a mesh)."""
    return batch_shards(mesh) if mesh is not None else 1


def row_sharding(mesh: Mesh | None, ndim: int = 1, leading: int = 0) -> NamedSharding | None:
    """Rows over the mesh's batch axes after `leading` whole axes, the `ndim - 1` axes after them whole (None
    without a mesh)."""
    if mesh is None:
        return None
    return NamedSharding(mesh, PartitionSpec(*([None] * leading), *batch_sharding(mesh, ndim).spec))


def check_rows(rows: int, mesh: Mesh | None) -> None:
    """Refuse batches whose `rows` do not split evenly over the mesh's batch shards."""
    shards = row_shards(mesh)
    if rows % shards:
        raise ValueError(
            f"batches of {rows} rows do not split over the mesh's {shards} batch shards "
            f"(axes {DEFAULT_RULES['batch']}); use a batch size that is a multiple of {shards}."
        )


# ---------------------------------------------------------------------------------- prefetch


def prefetch_with(pairs: Iterable[tuple[Any, Any]], sharding=None, size: int = 2) -> Iterator[tuple[Any, Any]]:
    """(meta, arrays placed by `sharding`) for every (meta, host arrays) of `pairs`, in order, placed up to `size`
    ahead from a background thread (`batching.prefetch`); meta (host-side counts, the host arrays) is untouched."""
    metas: collections.deque = collections.deque()  # filled by the prefetch thread before its item is queued

    def arrays_only():
        for meta, arrays in pairs:
            metas.append(meta)
            yield arrays

    placed = prefetch(arrays_only(), size, sharding)
    try:
        for arrays in placed:
            yield metas.popleft(), arrays
    finally:
        placed.close()
