"""The trainer's compiled steps and device placement: one jitted train step and one eval step per model graph.

Split from trainer.py, which keeps the loop, the configuration and the checkpointing. The model's weights
are an argument of every step (never a closure constant); the trainable parameters and the optimizer
state are donated so each step updates them in place. `precompile` compiles the train step for every
batch shape of an epoch at once, in threads (XLA compiles outside the GIL), before the first step runs;
compiling, placing rows on the mesh and prefetching are `lcc_jax.data.device`'s, shared with the runner.
Packed batches (segment ids in the attention mask) are traced inside `packed_rows(max_segments)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from lcc_jax.data.batching import Batch, pack_batch, packed_fill, prefetch
from lcc_jax.data.device import Executables, abstract, check_rows, layout, row_sharding
from lcc_jax.models.attention import attention_implementation, packed_rows
from lcc_jax.train.config import TrainConfig, make_optimizer
from lcc_jax.train.losses import next_token_nll

log = logging.getLogger(__name__)

ApplyFn = Callable[..., jax.Array]  # (model, trainable, tokens, attention_mask[, remat=]) -> (b, s, vocab) logits


def _step_relevant(config: TrainConfig) -> TrainConfig:
    """The config with the fields that cannot change the compiled step set to defaults (cache key)."""
    return dataclasses.replace(
        config, epochs=1, batch_size=1, grad_accum=1, seed=0, eval_every_epoch=True, log_every=1,
        checkpoint_every_steps=1, keep_checkpoints=1,
    )


@functools.lru_cache(maxsize=32)  # a recovery table's methods x settings, in one process
def _compiled(graphdef: nnx.GraphDef, apply_fn: ApplyFn, config: TrainConfig, total_steps: int,
              max_segments: int = 1, attention: str | None = None, stop_backward_at: int = 0):
    """(optimizer, train step function (jit it with `StepTable`), jitted eval step), cached per graph.

    max_segments > 1: the train step's batches are packed (up to that many sequences per row);
    attention: "xla"/"cudnn" forces an implementation where the model leaves it to "auto";
    stop_backward_at > 0: the train step's backward pass stops at that layer (`fit`'s argument).
    """
    optimizer = make_optimizer(config, total_steps)
    model_kw = {**_remat_kwargs(apply_fn, config.remat), **_cut_kwargs(apply_fn, stop_backward_at)}
    train_step = _train_step(graphdef, apply_fn, optimizer, model_kw, max_segments, attention)
    eval_step = _eval_step(graphdef, apply_fn, attention)
    return optimizer, train_step, eval_step


def _tracing(max_segments: int, attention: str | None) -> contextlib.ExitStack:
    """The trace-time context of a step: packed-row masks and the attention override."""
    stack = contextlib.ExitStack()
    if max_segments > 1:
        stack.enter_context(packed_rows(max_segments))
    if attention is not None:
        stack.enter_context(attention_implementation(attention))
    return stack


def _train_step(graphdef: nnx.GraphDef, apply_fn: ApplyFn, optimizer, model_kw: dict, max_segments: int = 1,
                attention: str | None = None):
    def train_step(frozen, trainable, opt_state, arrays):
        weights, constants = frozen
        model = nnx.merge(graphdef, weights)
        kw = _apply_kwargs(model_kw, constants)

        def micro(carry, mb):
            grad_sum, nll_sum, count = carry

            def loss_fn(t):
                with _tracing(max_segments, attention):
                    logits = apply_fn(model, t, mb["tokens"], mb["attention_mask"], **kw)
                total, n = next_token_nll(logits, mb["tokens"], mb["loss_mask"], mb["attention_mask"])
                return total, n

            (total, n), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (grad_sum, nll_sum + total, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (grad_sum, nll_sum, count), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)), arrays)
        denom = jnp.maximum(count, 1.0)
        # mean over the step's target tokens, in the parameters' dtype (so AdamW's moments keep it too)
        grads = jax.tree.map(lambda g, t: (g / denom).astype(t.dtype), grad_sum, trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        out = {"loss": nll_sum / denom, "grad_norm": optax.global_norm(grads), "targets": count}
        return trainable, opt_state, out

    return train_step


@functools.lru_cache(maxsize=32)
def _eval_step(graphdef: nnx.GraphDef, apply_fn: ApplyFn, attention: str | None = None):
    remat_kw = _remat_kwargs(apply_fn, False, quiet=True)

    def eval_step(frozen, trainable, tokens, attention_mask, loss_mask):
        weights, constants = frozen
        model = nnx.merge(graphdef, weights)
        with _tracing(1, attention):
            logits = apply_fn(model, trainable, tokens, attention_mask, **_apply_kwargs(remat_kw, constants))
        return next_token_nll(logits, tokens, loss_mask, attention_mask)

    return jax.jit(eval_step)


_STEPS = Executables()  # ((step function, batch sharding, argument layout), batch shape) -> executable


class StepTable:
    """The train step compiled ahead of time for each batch shape, and called by shape.

    Compiled executables are kept across `fit` calls with the same step function and argument
    layout (shapes, dtypes, shardings), so a resumed or repeated run compiles nothing. On a mesh the
    updated parameters and optimizer state are pinned to the layout they came in with; otherwise the
    compiler may pick another one for the outputs and the second step would compile again.
    """

    def __init__(self, step: Callable, frozen, trainable, opt_state, sharding: NamedSharding | None,
                 mesh: Mesh | None, rows: int | None = None, multiple: int = 256):
        out = None if mesh is None else (_shardings(trainable), _shardings(opt_state), None)
        self.jitted = jax.jit(step, donate_argnums=(1, 2), out_shardings=out)
        self.key = (step, sharding, (layout(frozen), layout(trainable), layout(opt_state)))
        self.args = abstract((frozen, trainable, opt_state))  # the live arrays are donated by the first step
        self.sharding, self.mesh, self.rows, self.multiple = sharding, mesh, rows, multiple
        self.compiled: dict[tuple[int, ...], Any] = {}

    def precompile(self, shapes: Iterable[tuple[int, ...]], workers: int = 8) -> None:
        """Compile the step for every new (accum, rows, seq) shape, concurrently (XLA compiles outside the GIL)."""
        todo, seconds = self._compile(sorted({tuple(s) for s in shapes} - set(self.compiled)), workers)
        if todo:
            log.info("compiled the train step for %d batch shape(s) (lengths %s) in %.1f s", len(todo),
                     [s[-1] for s in todo], seconds)

    def __call__(self, frozen, trainable, opt_state, arrays):
        shape = tuple(arrays["tokens"].shape)
        if shape not in self.compiled:
            todo, seconds = self._compile([shape])
            if todo:
                log.info("compiled the train step for a new batch shape %s in %.1f s", shape, seconds)
        return self.compiled[shape](frozen, trainable, opt_state, arrays)

    def _compile(self, shapes: list[tuple[int, ...]], workers: int = 8) -> tuple[list, float]:
        """Executables for `shapes` into `self.compiled`, kept ones reused: (shapes compiled now, seconds)."""
        if not shapes:
            return [], 0.0
        executables, todo, seconds = _STEPS.compile(self.jitted, shapes, self._lower_args, key=self.key,
                                                    mesh=self.mesh, workers=workers)
        self.compiled.update(executables)
        return todo, seconds

    def _lower_args(self, shape: tuple[int, ...]) -> tuple:
        arrays = {
            "tokens": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.sharding),
            "attention_mask": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.sharding),
            "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self.sharding),
        }
        return (*self.args, arrays)


def _shardings(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


def _step_groups(
    batches: Sequence[Batch], accum: int, pack_rows: int | None = None, multiple: int = 256
) -> Iterator[tuple[dict, int, int, int]]:
    """(arrays (accum, rows, seq), micro-batches used, target tokens, real tokens) per optimizer step.

    With `pack_rows`, each micro-batch is first packed into that many rows (`pack_batch`). A short
    last group is completed with all-filler micro-batches (no targets), so every step has `accum`
    micro-batches and the shape set stays small.
    """
    for start in range(0, len(batches), accum):
        group = list(batches[start : start + accum])
        rows = group[0].tokens.shape[0]
        if any(b.tokens.shape[0] != rows for b in group):
            raise ValueError("all micro-batches must have the same number of rows (make_batches(fill_last=True)).")
        used = len(group)
        if pack_rows is not None:
            group = [pack_batch(b, pack_rows, multiple) for b in group]
            rows = pack_rows
        seq = max(b.tokens.shape[1] for b in group)
        tokens = np.zeros((accum, rows, seq), np.int32)
        attention = np.zeros((accum, rows, seq), np.int32)
        attention[:, :, 0] = 1  # filler micro-batches: one visible key, no NaN
        loss = np.zeros((accum, rows, seq), np.float32)
        for i, b in enumerate(group):
            width = b.tokens.shape[1]
            tokens[i, :, :width] = b.tokens
            attention[i, :, :width] = b.attention_mask
            loss[i, :, :width] = b.attention_mask > 0 if b.loss_mask is None else b.loss_mask
        real = attention > 0
        targets = int(np.sum(loss[:, :, 1:] * real[:, :, 1:]))
        arrays = {"tokens": tokens, "attention_mask": attention, "loss_mask": loss}
        yield arrays, used, targets, int(real.sum())


def step_shapes(batches: Sequence[Batch], accum: int, pack_rows: int | None = None, multiple: int = 256
                ) -> set[tuple[int, int, int]]:
    """The (accum, rows, seq) shapes `_step_groups` gives these micro-batches, without building the arrays.

    The trainer compiles the step for every epoch's shapes before training, so no epoch stops to compile.
    """
    shapes = set()
    for start in range(0, len(batches), accum):
        group = batches[start : start + accum]
        if pack_rows is None:
            rows, seq = group[0].tokens.shape[0], max(b.tokens.shape[1] for b in group)
        else:
            rows = pack_rows
            seq = max(max(multiple, -(-packed_fill(b, pack_rows) // multiple) * multiple) for b in group)
        shapes.add((accum, int(rows), int(seq)))
    return shapes


def _evaluate(eval_step, frozen, trainable, batches: Sequence[Batch], mesh: Mesh | None) -> float:
    sharding = row_sharding(mesh, ndim=2)
    if batches:
        check_rows(batches[0].tokens.shape[0], mesh)
    sums = []
    for b in prefetch(batches, 2, sharding):
        loss_mask = b.attention_mask.astype(jnp.float32) if b.loss_mask is None else b.loss_mask
        sums.append(eval_step(frozen, trainable, b.tokens, b.attention_mask, loss_mask))
    totals = np.asarray(jax.device_get(sums), np.float64).reshape(-1, 2)
    return float(totals[:, 0].sum() / max(totals[:, 1].sum(), 1.0))


def _own_copy(tree: Any, mesh: Mesh | None, dtype=jnp.float32) -> Any:
    """Copies in `dtype` (the trainer donates its buffers; the caller's arrays must survive), placed on the mesh."""

    def place(x):
        x = jnp.array(x, dtype=dtype, copy=True)
        return x if mesh is None else jax.device_put(x, _kept_or_replicated(x, mesh))

    return jax.tree.map(place, tree)


def _apply_kwargs(remat_kw: dict, constants: Any) -> dict:
    return remat_kw if constants is None else {**remat_kw, "constants": constants}


def own_layout(tree: Any, mesh: Mesh | None, dtype=jnp.float32) -> Any:
    """What `_own_copy` would give, as ShapeDtypeStructs: no array is made (compiling ahead touches no device)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=_full_spec(_kept_or_replicated(x, mesh),
                                                                                            len(x.shape))), tree)


def placed_layout(tree: Any, mesh: Mesh | None) -> Any:
    """What `_place` would give, as ShapeDtypeStructs."""
    if tree is None:
        return None
    replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())  # device_put keeps the spec as given
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated or _on_default(x)), tree)


def init_state(optimizer, trainable: Any) -> Any:
    """The optimizer's first state, from one jitted program, so `state_layout` can tell its layout exactly."""
    return jax.jit(optimizer.init)(trainable)


def state_layout(optimizer, trainable_layout: Any) -> Any:
    """What `init_state` would give for parameters of this layout, as ShapeDtypeStructs: compiled, never run."""
    compiled = jax.jit(optimizer.init).lower(trainable_layout).compile()
    shapes = jax.eval_shape(optimizer.init, trainable_layout)
    return jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes,
                        compiled.output_shardings)


def _kept_or_replicated(x, mesh: Mesh | None):
    """`_own_copy`'s placement: a leaf already on the mesh keeps its sharding, others are replicated over it."""
    if mesh is None:
        return _on_default(x)
    sharding = getattr(x, "sharding", None)
    return sharding if isinstance(sharding, NamedSharding) and sharding.mesh == mesh else NamedSharding(
        mesh, PartitionSpec())


def _full_spec(sharding, ndim: int):
    """A NamedSharding with one spec entry per dimension, as arrays copied under a mesh (`_own_copy`) report theirs
    (P("fsdp") on a matrix reads P("fsdp", None)); the layout keys compare them literally."""
    if not isinstance(sharding, NamedSharding) or len(sharding.spec) >= ndim:
        return sharding
    return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec, *([None] * (ndim - len(sharding.spec)))),
                         memory_kind=sharding.memory_kind)


def _on_default(x):
    """A leaf's sharding, or the default device's for a ShapeDtypeStruct without one (where jnp puts new arrays)."""
    return getattr(x, "sharding", None) or SingleDeviceSharding(jax.devices()[0])


def _place(tree: Any, mesh: Mesh | None) -> Any:
    """Frozen extra arrays: replicated over the mesh (as they are without one)."""
    if tree is None or mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def _cut_kwargs(apply_fn: ApplyFn, stop_backward_at: int) -> dict:
    """{"stop_backward_at": n} when there is a cut and apply_fn takes the keyword (a warning when it does not)."""
    if not stop_backward_at:
        return {}
    if _takes(apply_fn, "stop_backward_at"):
        return {"stop_backward_at": stop_backward_at}
    log.warning("stop_backward_at=%d but apply_fn takes no `stop_backward_at` keyword; the backward pass runs "
                "through every layer", stop_backward_at)
    return {}


def _takes(apply_fn: ApplyFn, keyword: str) -> bool:
    """Whether apply_fn accepts `keyword` (by name or through **kwargs)."""
    try:
        params = inspect.signature(apply_fn).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _remat_kwargs(apply_fn: ApplyFn, remat: bool, quiet: bool = False) -> dict:
    if _takes(apply_fn, "remat"):
        return {"remat": remat}
    if remat and not quiet:
        log.warning("config.remat=True but apply_fn takes no `remat` keyword; training without remat")
    return {}
