"""Many restorations in one compiled run: R compensation sets trained side by side over one frozen model.

A grid member is a `Compensation` (any heads, mode, basis rows) with its own learning rate and data
seed. All members share the frozen model, the compile and the step; each has its own data order, its
own AdamW state and its own gradient clipping, so every member ends where a single `fit` of that
configuration ends (`tests/test_grid.py` checks it).

How: every member is held densely over all L·H heads, β and b of shape (R, L·H, d), with 0/1 masks
that say which entries it trains (its heads, its mode, the basis rows it has). Masked entries start
at 0, get zero gradient and so stay 0 under AdamW; the global gradient norm is unchanged by them.
The basis (L·H, d, d) is shared: a head's rows are the same lost directions in every member (a member
may zero some rows, e.g. the restricted span). Each step puts every member's micro-batch into its own
rows of one batch, and the model's compensation door adds member r's δ to its rows only
(`compensation` of shape (layers, batch, heads, head_dim)); per-member losses and gradients separate
exactly because no row sees another member's parameters. The optimizer runs with learning rate 1
under vmap over members, and each member's update is scaled by its own rate (AdamW's update is
linear in the rate, weight decay included). The backward pass stops at the lowest layer any member
compensates (the model's `stop_backward_at`): the frozen layers below it run forward only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from lcc_jax.config import ModelConfig
from lcc_jax.data.batching import Batch, pack_multiple_for, packed_fill, prefetch
from lcc_jax.data.device import check_rows, row_sharding, row_shards, xla_fallback
from lcc_jax.progress import bar
from lcc_jax.restore.compensation import _TRAINABLE, Compensation, lowest_layer
from lcc_jax.train import BatchesFn, TrainConfig, cast_for_compute, make_optimizer
from lcc_jax.train.losses import next_token_nll
from lcc_jax.train.steps import (
    StepTable,
    _own_copy,
    _place,
    _step_groups,
    _step_relevant,
    _tracing,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GridMember:
    """One restoration of a grid: its initial compensation, learning rate and data-order seed."""

    name: str
    compensation: Compensation
    learning_rate: float
    seed: int  # TrainConfig.seed of the single run this member reproduces (data order)


@dataclasses.dataclass(frozen=True)
class GridResult:
    """A trained member: the same fields a single `fit` gives, as a Compensation."""

    name: str
    compensation: Compensation
    history: dict[str, list[float]]  # loss and grad_norm per step, valid_loss per epoch
    steps: int
    seconds: float  # wall time of the whole grid (shared by its members)


def stack_members(members: Sequence[GridMember], config: ModelConfig) -> tuple[dict, dict]:
    """(trainable {"beta", "bias"}: (R, L·H, d) each, constants {"basis", "beta_mask", "bias_mask", "lr"})."""
    total, d = config.total_heads, config.head_dim
    r = len(members)
    basis = np.zeros((total, d, d), np.float32)
    filled = np.zeros((total, d), bool)  # rows of the shared basis already set
    beta = np.zeros((r, total, d), np.float32)
    bias = np.zeros((r, total, d), np.float32)
    beta_mask = np.zeros((r, total, d), np.float32)
    bias_mask = np.zeros((r, total, d), np.float32)
    for i, m in enumerate(members):
        c = m.compensation
        heads = np.asarray(c.heads)
        if heads.size and (heads.min() < 0 or heads.max() >= total):
            raise ValueError(f"grid member {m.name!r} has heads outside the model's {total}.")
        member_basis = np.asarray(c.basis, np.float32)  # (k, d, d)
        rows = np.abs(member_basis).sum(-1) > 0  # (k, d): rows this member has
        clash = filled[heads] & rows & ~np.isclose(basis[heads], member_basis, atol=1e-6).all(-1)
        if clash.any():
            raise ValueError(
                f"grid member {m.name!r} has other lost directions on head {int(heads[np.argwhere(clash)[0, 0]])} "
                "than an earlier member; members share one basis (build them from the same components)."
            )
        basis[heads] = np.where(rows[..., None], member_basis, basis[heads])
        filled[heads] |= rows
        trains = _TRAINABLE[c.mode]
        if "beta" in trains:
            beta[i, heads] = np.asarray(c.beta)
            beta_mask[i, heads] = rows
        if "bias" in trains:
            bias[i, heads] = np.asarray(c.bias)
            bias_mask[i, heads] = 1.0
    trainable = {"beta": beta * beta_mask, "bias": bias * bias_mask}
    constants = {"basis": basis, "beta_mask": beta_mask, "bias_mask": bias_mask,
                 "lr": np.asarray([m.learning_rate for m in members], np.float32)}
    return trainable, constants


def grid_delta(trainable: dict, constants: dict) -> jax.Array:
    """(R, L·H, d): δ of every member, Σ_i β_i·basis_i + b on its masked entries."""
    beta = trainable["beta"] * constants["beta_mask"]
    bias = trainable["bias"] * constants["bias_mask"]
    return jnp.einsum("rti,tid->rtd", beta, constants["basis"], precision=jax.lax.Precision.HIGHEST) + bias


def unstack_member(trainable: dict, members: Sequence[GridMember], index: int) -> Compensation:
    """Member `index` of a trained grid as the Compensation a single run would return."""
    c = members[index].compensation
    heads = np.asarray(c.heads)
    trains = _TRAINABLE[c.mode]
    beta = np.asarray(trainable["beta"][index])[heads] if "beta" in trains else np.asarray(c.beta)
    bias = np.asarray(trainable["bias"][index])[heads] if "bias" in trains else np.asarray(c.bias)
    return dataclasses.replace(c, beta=jnp.asarray(beta), bias=jnp.asarray(bias))


def fit_grid(
    model: nnx.Module,
    members: Sequence[GridMember],
    batches_for_seed: Callable[[int], BatchesFn],
    config: TrainConfig,
    *,
    valid_batches: Sequence[Batch] | None = None,
    mesh: Mesh | None = None,
    pack: bool = True,
) -> list[GridResult]:
    """Train every member for `config.epochs` epochs; `batches_for_seed(seed)` is a single run's batches_fn.

    `config`'s learning rate and seed are ignored (each member has its own); everything else (epochs,
    batch, accumulation, clipping, dtype) is shared.
    """
    if not members:
        raise ValueError("a grid needs at least one member.")
    if config.param_dtype != "float32":
        raise ValueError(f"fit_grid trains float32 parameters only (param_dtype {config.param_dtype!r}); train "
                         "bfloat16 parameters one run at a time with lcc_jax.train.fit.")
    started = time.perf_counter()
    model_config = model.config
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
    seeds = sorted({m.seed for m in members})
    batch_fns = {s: batches_for_seed(s) for s in seeds}
    first = {s: list(batch_fns[s](0)) for s in seeds}
    micro = len(first[seeds[0]])
    if micro == 0 or any(len(b) != micro for b in first.values()):
        raise ValueError("every seed's first epoch must yield the same, non-zero number of micro-batches.")
    rows = row_shards(mesh) if pack else first[seeds[0]][0].tokens.shape[0]
    check_rows(len(members) * rows, mesh)
    multiple = pack_multiple_for([packed_fill(b, rows) for s in seeds for b in first[s]]) if pack else 1
    total_steps = config.epochs * config.steps_per_epoch(micro)
    stacked, constants = stack_members(members, model_config)

    context = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with context:
        graphdef, frozen = cast_for_compute(model, dtype, mesh)
        trainable = _own_copy(stacked, mesh)
        constants = _place(jax.tree.map(jnp.asarray, constants), mesh)
        step_config = _step_relevant(dataclasses.replace(config, learning_rate=1.0))
        segments = config.batch_size if pack else 1
        cut = min(lowest_layer(m.compensation, model_config) for m in members)  # no backward pass below it
        optimizer, step = _grid_step(graphdef, step_config, total_steps, segments, len(members), None, cut)
        opt_state = jax.vmap(optimizer.init)(trainable)
        sharding = row_sharding(mesh, ndim=2, leading=1)  # (accum, rows, seq): rows over the mesh
        groups = _GridGroups(members, batch_fns, first, config.grad_accum, rows if pack else None, multiple)

        def compiled_steps(attention: str | None) -> StepTable:
            """The grid step compiled for the first epoch's shapes, with `attention` forced (as in `fit`)."""
            fn = step if attention is None else _grid_step(graphdef, step_config, total_steps, segments,
                                                           len(members), attention, cut)[1]
            steps = StepTable(fn, (frozen, constants), trainable, opt_state, sharding, mesh, rows, multiple)
            steps.precompile(groups.shapes(0))
            return steps

        steps = xla_fallback(compiled_steps, "the grid step")
        history = {m.name: {"loss": [], "grad_norm": [], "valid_loss": []} for m in members}
        pending: list[dict] = []
        with bar(total=total_steps, desc=f"train x{len(members)}", unit="step") as progress:
            for epoch in range(config.epochs):
                for arrays in prefetch(groups.epoch(epoch), 2, sharding):
                    trainable, opt_state, out = steps((frozen, constants), trainable, opt_state, arrays)
                    pending.append(out)
                    progress.update(1)
                    if len(pending) > config.log_every:
                        _record(history, members, pending[:-1])
                        pending = pending[-1:]
                _record(history, members, pending)
                pending = []
                if valid_batches and (config.eval_every_epoch or epoch + 1 == config.epochs):
                    losses = grid_valid_loss(model, trainable, constants, valid_batches, config, mesh=mesh,
                                             graphdef_frozen=(graphdef, frozen))
                    for m, loss in zip(members, losses):
                        history[m.name]["valid_loss"].append(float(loss))
                    log.info("epoch %d/%d: valid loss %s", epoch + 1, config.epochs,
                             ", ".join(f"{m.name} {x:.4f}" for m, x in zip(members, losses)))
        trained = jax.device_get(trainable)
    seconds = time.perf_counter() - started
    log.info("trained %d restorations x %d steps in %.1f s", len(members), total_steps, seconds)
    return [GridResult(m.name, unstack_member(trained, members, i), history[m.name], total_steps, seconds)
            for i, m in enumerate(members)]


def grid_valid_loss(model, trainable: dict, constants: dict, batches: Sequence[Batch], config: TrainConfig, *,
                    mesh: Mesh | None = None, graphdef_frozen=None, members_per_pass: int = 8) -> np.ndarray:
    """(R,) mean next-token NLL over the targets of `batches` for every member."""
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
    graphdef, frozen = graphdef_frozen or cast_for_compute(model, dtype, mesh)
    delta = grid_delta(trainable, constants)  # (R, T, d)
    r = delta.shape[0]
    sums, counts = np.zeros(r), np.zeros(r)
    eval_step = _grid_eval_step(graphdef)
    sharding = row_sharding(mesh, ndim=2)
    for start in range(0, r, members_per_pass):
        chunk = delta[start : start + members_per_pass]
        for b in prefetch(batches, 2, sharding):
            loss_mask = b.attention_mask.astype(jnp.float32) if b.loss_mask is None else b.loss_mask
            s, n = jax.device_get(eval_step(frozen, chunk, b.tokens, b.attention_mask, loss_mask))
            sums[start : start + len(s)] += s
            counts[start : start + len(s)] += n
    return sums / np.maximum(counts, 1.0)


# ---------------------------------------------------------------------------------------- internals


def _per_row(delta: jax.Array, config: ModelConfig, rows: int) -> jax.Array:
    """(R, T, d) -> (layers, R·rows, heads, d): member r's δ on its `rows` consecutive batch rows."""
    r = delta.shape[0]
    per_member = delta.reshape(r, config.num_layers, config.num_heads, config.head_dim)
    return jnp.repeat(jnp.moveaxis(per_member, 0, 1), rows, axis=1)


def _member_nll(logits, tokens, loss_mask, attention_mask, members: int):
    """(R,) sums and (R,) counts of next-token NLL, rows grouped by member."""
    split = lambda x: x.reshape(members, -1, *x.shape[1:])  # noqa: E731
    return jax.vmap(next_token_nll)(split(logits), split(tokens), split(loss_mask), split(attention_mask))


@functools.lru_cache(maxsize=8)
def _grid_step(graphdef: nnx.GraphDef, config: TrainConfig, total_steps: int, max_segments: int, members: int,
               attention: str | None = None, stop_backward_at: int = 0):
    """(optimizer at learning rate 1, the grid's train step), cached so a repeated grid compiles nothing.

    stop_backward_at: the lowest layer any member compensates; the backward pass stops there.
    """
    optimizer = make_optimizer(config, total_steps)

    def train_step(frozen, trainable, opt_state, arrays):
        (weights, constants) = frozen
        model = nnx.merge(graphdef, weights)
        rows = arrays["tokens"].shape[1] // members

        def micro(carry, mb):
            grad_sum, nll_sum, count = carry

            def loss_fn(t):
                delta = _per_row(grid_delta(t, constants), model.config, rows).astype(model.dtype)
                with _tracing(max_segments, attention):
                    logits = model(mb["tokens"], mb["attention_mask"], compensation=delta, remat=config.remat,
                                   stop_backward_at=stop_backward_at).logits
                totals, n = _member_nll(logits, mb["tokens"], mb["loss_mask"], mb["attention_mask"], members)
                return jnp.sum(totals), (totals, n)

            grads, (totals, n) = jax.grad(loss_fn, has_aux=True)(trainable)
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (grad_sum, nll_sum + totals, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        init = (zeros, jnp.zeros(members, jnp.float32), jnp.zeros(members, jnp.float32))
        (grad_sum, nll_sum, count), _ = jax.lax.scan(micro, init, arrays)
        denom = jnp.maximum(count, 1.0)  # (R,)
        grads = jax.tree.map(lambda g: g / denom[:, None, None], grad_sum)

        def update(g, state, params, lr):
            updates, state = optimizer.update(g, state, params)
            return optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates)), state

        trainable, opt_state = jax.vmap(update)(grads, opt_state, trainable, constants["lr"])
        norms = jax.vmap(optax.global_norm)(grads)
        return trainable, opt_state, {"loss": nll_sum / denom, "grad_norm": norms}

    return optimizer, train_step


@functools.lru_cache(maxsize=8)
def _grid_eval_step(graphdef: nnx.GraphDef):
    @jax.jit
    def eval_step(frozen, delta, tokens, attention_mask, loss_mask):
        model = nnx.merge(graphdef, frozen)
        r, rows = delta.shape[0], tokens.shape[0]
        tile = lambda x: jnp.tile(x, (r,) + (1,) * (x.ndim - 1))  # noqa: E731
        comp = _per_row(delta, model.config, rows).astype(model.dtype)
        logits = model(tile(tokens), tile(attention_mask), compensation=comp).logits
        return _member_nll(logits, tile(tokens), tile(loss_mask), tile(attention_mask), r)

    return eval_step


class _GridGroups:
    """Every member's micro-batches of a step, packed, padded to one length and stacked along the rows."""

    def __init__(self, members, batch_fns, first, accum: int, pack_rows: int | None, multiple: int):
        self.members, self.batch_fns, self.first = members, batch_fns, first
        self.accum, self.pack_rows, self.multiple = accum, pack_rows, multiple

    def _per_seed(self, epoch: int) -> dict[int, list[dict]]:
        out = {}
        for seed, fn in self.batch_fns.items():
            batches = self.first[seed] if epoch == 0 else list(fn(epoch))
            out[seed] = [g[0] for g in _step_groups(batches, self.accum, self.pack_rows, self.multiple)]
        return out

    def shapes(self, epoch: int) -> list[tuple[int, ...]]:
        return sorted({tuple(a["tokens"].shape) for a in self.epoch(epoch)})

    def epoch(self, epoch: int):
        per_seed = self._per_seed(epoch)
        steps = {len(v) for v in per_seed.values()}
        if len(steps) != 1:
            raise ValueError(f"the seeds' data orders give different step counts in epoch {epoch}: {sorted(steps)}.")
        for i in range(steps.pop()):
            parts = [per_seed[m.seed][i] for m in self.members]
            seq = max(p["tokens"].shape[-1] for p in parts)
            yield {key: np.concatenate([_pad_to(p[key], seq, key) for p in parts], axis=1)
                   for key in ("tokens", "attention_mask", "loss_mask")}


def _pad_to(x: np.ndarray, seq: int, key: str) -> np.ndarray:
    """Right-pad (accum, rows, s) to `seq` with padding (segment 0, no target)."""
    if x.shape[-1] == seq:
        return x
    return np.pad(x, ((0, 0), (0, 0), (0, seq - x.shape[-1])))


def _record(history: dict, members: Sequence[GridMember], outs: list[dict]) -> None:
    for out in jax.device_get(outs):
        for i, m in enumerate(members):
            history[m.name]["loss"].append(float(out["loss"][i]))
            history[m.name]["grad_norm"].append(float(out["grad_norm"][i]))

