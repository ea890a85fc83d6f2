"""The trainer's compiled steps and device placement: one jitted train step and one eval step per model graph.

Split from train.py, which keeps the loop, the configuration and the checkpointing. The model's weights
are an argument of every step (never a closure constant); the trainable parameters and the optimizer
state are donated so each step updates them in place.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcc_jax.data.batching import Batch, prefetch
from lcc_jax.restore.losses import next_token_nll
from lcc_jax.restore.train_config import TrainConfig, make_optimizer
from lcc_jax.sharding import DEFAULT_RULES, batch_sharding

log = logging.getLogger(__name__)

ApplyFn = Callable[..., jax.Array]  # (model, trainable, tokens, attention_mask[, remat=]) -> (b, s, vocab) logits


def _step_relevant(config: TrainConfig) -> TrainConfig:
    """The config with the fields that cannot change the compiled step set to defaults (cache key)."""
    return dataclasses.replace(
        config, epochs=1, batch_size=1, grad_accum=1, seed=0, eval_every_epoch=True, log_every=1,
        checkpoint_every_steps=1, keep_checkpoints=1,
    )


@functools.lru_cache(maxsize=8)
def _compiled(graphdef: nnx.GraphDef, apply_fn: ApplyFn, config: TrainConfig, total_steps: int):
    """(optimizer, jitted train step, jitted eval step), cached so repeated or resumed runs compile once."""
    optimizer = make_optimizer(config, total_steps)
    train_step = _train_step(graphdef, apply_fn, optimizer, _remat_kwargs(apply_fn, config.remat))
    eval_step = _eval_step(graphdef, apply_fn)
    return optimizer, train_step, eval_step


def _train_step(graphdef: nnx.GraphDef, apply_fn: ApplyFn, optimizer, remat_kw: dict):
    def step(frozen, trainable, opt_state, arrays):
        weights, constants = frozen
        model = nnx.merge(graphdef, weights)
        kw = _apply_kwargs(remat_kw, constants)

        def micro(carry, mb):
            grad_sum, nll_sum, count = carry

            def loss_fn(t):
                logits = apply_fn(model, t, mb["tokens"], mb["attention_mask"], **kw)
                total, n = next_token_nll(logits, mb["tokens"], mb["loss_mask"], mb["attention_mask"])
                return total, n

            (total, n), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (grad_sum, nll_sum + total, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (grad_sum, nll_sum, count), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)), arrays)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grad_sum)  # mean over the step's target tokens
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        out = {"loss": nll_sum / denom, "grad_norm": optax.global_norm(grads), "targets": count}
        return trainable, opt_state, out

    return jax.jit(step, donate_argnums=(1, 2))


@functools.lru_cache(maxsize=8)
def _eval_step(graphdef: nnx.GraphDef, apply_fn: ApplyFn):
    remat_kw = _remat_kwargs(apply_fn, False, quiet=True)

    def step(frozen, trainable, tokens, attention_mask, loss_mask):
        weights, constants = frozen
        model = nnx.merge(graphdef, weights)
        logits = apply_fn(model, trainable, tokens, attention_mask, **_apply_kwargs(remat_kw, constants))
        return next_token_nll(logits, tokens, loss_mask, attention_mask)

    return jax.jit(step)


def _evaluate(eval_step, frozen, trainable, batches: Sequence[Batch], mesh: Mesh | None) -> float:
    sharding = _batch_sharding(mesh, leading=0)
    if batches:
        _check_rows(batches[0].tokens.shape[0], mesh)
    sums = []
    for b in prefetch(batches, 2, sharding):
        loss_mask = b.attention_mask.astype(jnp.float32) if b.loss_mask is None else b.loss_mask
        sums.append(eval_step(frozen, trainable, b.tokens, b.attention_mask, loss_mask))
    totals = np.asarray(jax.device_get(sums), np.float64).reshape(-1, 2)
    return float(totals[:, 0].sum() / max(totals[:, 1].sum(), 1.0))


def _check_rows(rows: int, mesh: Mesh | None) -> None:
    if mesh is None:
        return
    axes = DEFAULT_RULES["batch"]
    shards = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    if rows % shards:
        raise ValueError(
            f"batches of {rows} rows do not split over the mesh's {shards} batch shards "
            f"(axes {axes}); use a batch size that is a multiple of {shards}."
        )


def _batch_sharding(mesh: Mesh | None, leading: int) -> NamedSharding | None:
    """Rows over the mesh's batch axes, after `leading` unsharded axes (the micro-batch axis)."""
    if mesh is None:
        return None
    spec = batch_sharding(mesh).spec
    return NamedSharding(mesh, PartitionSpec(*([None] * leading), *spec))


def _own_copy(tree: Any, mesh: Mesh | None) -> Any:
    """fp32 copies (the trainer donates its buffers; the caller's arrays must survive), placed on the mesh."""

    def place(x):
        x = jnp.array(x, dtype=jnp.float32, copy=True)
        if mesh is None:
            return x
        keep = isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        return jax.device_put(x, x.sharding if keep else NamedSharding(mesh, PartitionSpec()))

    return jax.tree.map(place, tree)


def _apply_kwargs(remat_kw: dict, constants: Any) -> dict:
    return remat_kw if constants is None else {**remat_kw, "constants": constants}


def _place(tree: Any, mesh: Mesh | None) -> Any:
    """Frozen extra arrays: replicated over the mesh (as they are without one)."""
    if tree is None or mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def _remat_kwargs(apply_fn: ApplyFn, remat: bool, quiet: bool = False) -> dict:
    try:
        params = inspect.signature(apply_fn).parameters
    except (TypeError, ValueError):
        params = {}
    if "remat" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {"remat": remat}
    if remat and not quiet:
        log.warning("config.remat=True but apply_fn takes no `remat` keyword; training without remat")
    return {}
