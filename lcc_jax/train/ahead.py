"""What `fit` sets up before its first step, and compiling it ahead of time on a thread.

`cast_for_compute` gives the frozen weights in the compute dtype (or only their layout); `plan_fit` derives from the
batches and the config every epoch's step shapes and the schedule; `step_table` compiles the train step for those
shapes (`steps.StepTable`, with the XLA fallback). `precompile_fit` runs the same three from shapes alone on a thread,
so a job can compile its train step while it captures (the benchmark job) or evaluates (the restore job), and `fit`
then finds the executables. Where an earlier run already compiled the same step through the persistent cache, the
thread leaves it to `fit` (reading back takes seconds, and a cuDNN program read back beside other device work can
fail its first run on a GPU: `compile_cache.read_back_failure`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lcc_jax import compile_cache
from lcc_jax.data.batching import Batch, pack_multiple_for, packed_fill
from lcc_jax.data.device import check_rows, layout, row_sharding, row_shards, xla_fallback
from lcc_jax.sharding import flat_params, param_shardings
from lcc_jax.train.config import TrainConfig
from lcc_jax.train.steps import (
    ApplyFn,
    StepTable,
    _compiled,
    _step_relevant,
    own_layout,
    placed_layout,
    state_layout,
    step_shapes,
)

log = logging.getLogger(__name__)

BatchesFn = Callable[[int], Iterable[Batch]]  # epoch -> that epoch's micro-batches, deterministic


def cast_for_compute(model: nnx.Module, dtype, mesh: Mesh | None = None, *, abstract_only: bool = False
                     ) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of a copy of `model` computing in `dtype`; `model` itself is left untouched.

    Floating weights are cast (no copy when they already have `dtype`: load the model in the compute
    dtype to save memory). With a mesh, weights not yet on it are placed by the sharding table.
    `abstract_only`: the state as ShapeDtypeStructs with the shardings the copy would have, and no copy
    made (what compiling the train step ahead of time needs).
    """
    graphdef, state = nnx.split(model)
    shardings = param_shardings(model, mesh) if mesh is not None else {}

    def cast(path, var):
        x = var[...]
        to = dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        on_mesh = mesh is None or (isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh)
        place = None if on_mesh else shardings.get(path)
        if abstract_only:
            var.set_value(jax.ShapeDtypeStruct(x.shape, to, sharding=place or x.sharding))
        else:
            x = x.astype(to)
            var.set_value(x if place is None else jax.device_put(x, place))  # replace, not write into the old array

    state = jax.tree.map(lambda x: x, state)  # a new state: the model's own variables stay as they are
    for path, var in flat_params(state).items():
        cast(path, var)
    compute = nnx.merge(graphdef, state)
    if hasattr(compute, "dtype"):
        compute.dtype = dtype
    embed = getattr(compute, "embed", None)
    if isinstance(embed, nnx.Embed):
        embed.dtype = dtype  # the embedding lookup sets the activations' dtype
    return nnx.split(compute)


def precompile_fit(
    model: nnx.Module,
    trainable: Any,
    apply_fn: ApplyFn,
    train_batches_fn: BatchesFn,
    config: TrainConfig,
    *,
    mesh: Mesh | None = None,
    constants: Any = None,
    pack: bool = True,
    pack_multiple: int | None = None,
    stop_backward_at: int = 0,
) -> concurrent.futures.Future:
    """Compile `fit`'s train step for these arguments on a background thread; returns its Future.

    For a job that knows its training set and the shapes of what it will train before it knows their values
    (RestoreLCC's heads come from probes that run after capture): start this first, capture while XLA compiles,
    then call `fit` with arguments of the same shapes and it compiles nothing. `trainable` and `constants` may
    be ShapeDtypeStructs; the model's weights are only looked at (no copy is made). The Future's result is the
    number of shapes compiled; a failure is logged and gives 0 (`fit` then compiles as it would anyway). `fit`
    need not wait for it: a program still compiling here is waited for there, not compiled twice (`Executables`).
    """

    # the weights' layout now, in this thread: the caller may go on to change the model (pruning donates them)
    graphdef, frozen = cast_for_compute(model, compute_dtype(config), mesh, abstract_only=True)

    def work() -> int:
        try:
            plan = plan_fit(train_batches_fn, config, mesh, pack, pack_multiple)
            with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
                params = own_layout(trainable, mesh, jnp.dtype(config.param_dtype))
                placed = placed_layout(constants, mesh)
                program = step_description(model, apply_fn, plan, (frozen, placed), params, stop_backward_at)
                if compile_cache.remembered(_TRAIN_STEP, program):
                    log.info("the train step for these shapes is in the compile cache (%s); fit reads it back when it "
                             "starts, not beside device work", compile_cache.folder())
                    return 0
                optimizer = _compiled(graphdef, apply_fn, plan.step_config, plan.total_steps, plan.max_segments,
                                      None, stop_backward_at)[0]
                steps, _ = step_table(graphdef, (frozen, placed), params, state_layout(optimizer, params), apply_fn,
                                      plan, mesh, stop_backward_at)
            compile_cache.remember(_TRAIN_STEP, program)
            return len(steps.compiled)
        except Exception as e:  # noqa: BLE001 - compiling ahead is an optimisation; fit compiles what is missing
            log.warning("compiling the train step ahead of time failed (%s: %s); fit will compile it",
                        type(e).__name__, e)
            return 0

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="precompile_fit")
    future = pool.submit(work)
    pool.shutdown(wait=False)
    return future


_TRAIN_STEP = "train step"


def step_description(model: nnx.Module, apply_fn: ApplyFn, plan: Plan, frozen: Any, trainable: Any,
                     stop_backward_at: int) -> str:
    """Everything of one `fit` that shapes its compiled train steps, as text that is the same in every process: the
    model's class and config, the function trained, the step's config and schedule length, the arguments' layouts
    and every batch shape (the note `compile_cache.remember` keys on, with the toolchain)."""
    config = getattr(model, "config", None)
    return "\n".join([
        f"{type(model).__module__}.{type(model).__qualname__} {config!r}",
        f"{getattr(apply_fn, '__module__', '?')}.{getattr(apply_fn, '__qualname__', repr(apply_fn))}",
        f"{plan.step_config!r} steps={plan.total_steps} segments={plan.max_segments} rows={plan.rows} "
        f"multiple={plan.pack_multiple} stop_backward_at={stop_backward_at} stack={plan.stack_sharding!r}",
        repr(layout(frozen)), repr(layout(trainable)), repr(sorted(plan.shapes)),
    ])


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `fit` derives from its batches and config before compiling: the step's shapes and schedule."""

    first_epoch: list[Batch]
    micro_per_epoch: int
    total_steps: int
    max_segments: int
    step_config: TrainConfig
    rows: int | None  # packed rows per micro-batch (None: not packed)
    pack_multiple: int | None
    shapes: set[tuple[int, int, int]]  # every epoch's (accum, rows, seq)
    stack_sharding: NamedSharding | None


def plan_fit(train_batches_fn: BatchesFn, config: TrainConfig, mesh: Mesh | None, pack: bool,
          pack_multiple: int | None) -> Plan:
    first_epoch = list(train_batches_fn(0))
    if not first_epoch:
        raise ValueError("train_batches_fn(0) yielded no batches.")
    check_rows(first_epoch[0].tokens.shape[0], mesh)
    rows = row_shards(mesh) if pack else None
    if pack and pack_multiple is None:
        pack_multiple = pack_multiple_for([packed_fill(b, rows) for b in first_epoch])
    # every epoch's shapes (later epochs reshuffle, so rows may pack longer or shorter than epoch 0's)
    shapes = step_shapes(first_epoch, config.grad_accum, rows, pack_multiple)
    for epoch in range(1, config.epochs):
        shapes |= step_shapes(list(train_batches_fn(epoch)), config.grad_accum, rows, pack_multiple)
    return Plan(first_epoch, len(first_epoch), config.epochs * config.steps_per_epoch(len(first_epoch)),
                 config.batch_size if pack else 1, _step_relevant(config), rows, pack_multiple, shapes,
                 row_sharding(mesh, ndim=2, leading=1))  # (accum, rows, seq): rows over the mesh


def step_table(graphdef, frozen, trainable, opt_state, apply_fn: ApplyFn, plan: Plan, mesh: Mesh | None,
                stop_backward_at: int) -> tuple[StepTable, Callable]:
    """(the train step compiled for every shape of `plan`, the eval step); XLA attention where a fused one fails."""

    def compiled_steps(attention: str | None) -> tuple[StepTable, Callable]:
        _, train_step, eval_step = _compiled(graphdef, apply_fn, plan.step_config, plan.total_steps,
                                             plan.max_segments, attention, stop_backward_at)
        steps = StepTable(train_step, frozen, trainable, opt_state, plan.stack_sharding, mesh, plan.rows,
                          plan.pack_multiple)
        steps.precompile(plan.shapes)
        return steps, eval_step

    return xla_fallback(compiled_steps, "the train step")


def compute_dtype(config: TrainConfig):
    return jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32

