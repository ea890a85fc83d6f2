"""The optax trainer shared by RestoreLCC and the baselines (LoRA, DoRA, LoFiT, bias-only).

Only `trainable` (any pytree of arrays) learns. The frozen model's weights are cast once to the
compute dtype and passed to the jitted step as an argument (a closed-over array would be baked into
the program as a constant), never updated and never donated. The trainable parameters and the
optimizer state stay fp32 and are donated, so each step updates them in place.

It reproduces the reference's Hugging Face Trainer set-up (RestoreLCC_train.py):
  * AdamW (torch's decoupled form: p -= lr·(m̂/(√v̂+ε) + wd·p)), lr 1e-3, betas (0.9, 0.999), ε 1e-8,
    weight decay 0.0 (the TrainingArguments default; the reference keeps it);
  * gradients clipped to global norm 1.0 (max_grad_norm default), after accumulation;
  * lr linear from `learning_rate` to 0 over all optimizer steps after `warmup_steps` of linear warm-up
    (get_linear_schedule_with_warmup; the first step uses the full rate when there is no warm-up);
  * loss: next-token cross-entropy over the target tokens (loss-mask 1 on the label side), averaged
    over the targets of the batch; with gradient accumulation, over the targets of all micro-batches
    of the step (as transformers >= 4.46 does with `num_items_in_batch`), so `grad_accum=2` at batch 4
    gives the gradient of batch 8;
  * validation loss once per epoch: here the mean over all target tokens of the validation set (HF
    averages per-batch means, weighted by rows).
The reference trains in pure bf16 (its LoFiT vectors are bf16 parameters); we keep fp32 master copies.

`apply_fn(model, trainable, tokens, attention_mask) -> logits` says how the trainable parameters enter
the model. If it takes a `remat` keyword it receives `TrainConfig.remat` while training; frozen extra
arrays go in `fit(constants=...)` and reach it as `constants=` (closed-over arrays would be baked into
the compiled program). For RestoreLCC (`compensation.split_trainable` gives (trainable, frozen)):

    def apply_fn(model, trainable, tokens, mask, *, constants, remat=False):
        delta = to_dense(trainable, constants, model.config)  # (layers, heads, head_dim)
        return model(tokens, mask, compensation=delta, remat=remat).logits

    fit(model, trainable, apply_fn, epoch_batches(seqs, masks, config, pad_id=pad), config, constants=frozen)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcc_jax.data.batching import Batch, make_batches, prefetch
from lcc_jax.progress import bar
from lcc_jax.restore.losses import next_token_nll
from lcc_jax.restore.train_state import TrainCheckpointer, TrainProgress
from lcc_jax.sharding import DEFAULT_RULES, batch_sharding, flat_params, param_shardings

log = logging.getLogger(__name__)

ApplyFn = Callable[..., jax.Array]  # (model, trainable, tokens, attention_mask[, remat=]) -> (b, s, vocab) logits
BatchesFn = Callable[[int], Iterable[Batch]]  # epoch -> that epoch's micro-batches, deterministic
Callback = Callable[[int, int], None]  # (optimizer steps done, epoch) after every step; raising aborts

# Fields that may change between a run and its resumption; any other change is refused.
_RESUMABLE_CHANGES = ("log_every", "checkpoint_every_steps", "keep_checkpoints", "eval_every_epoch")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; the defaults are the reference's (paper: 3 epochs, batch 8, lr 1e-3)."""

    learning_rate: float = 1e-3
    epochs: int = 3
    batch_size: int = 8  # rows per micro-batch (HF per_device_train_batch_size)
    grad_accum: int = 1  # micro-batches per optimizer step
    weight_decay: float = 0.0  # HF TrainingArguments default
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    seed: int = 42  # data order (see `epoch_batches`); the trainer itself draws no random numbers
    eval_every_epoch: bool = True  # False: validate only after the last epoch
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    remat: bool = False  # recompute each layer in the backward pass (passed to apply_fn)
    log_every: int = 10  # optimizer steps between log lines
    checkpoint_every_steps: int = 200  # plus one at every epoch end
    keep_checkpoints: int = 2

    def __post_init__(self):
        if self.compute_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"compute_dtype must be 'bfloat16' or 'float32', not {self.compute_dtype!r}.")
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "checkpoint_every_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}.")

    def steps_per_epoch(self, micro_batches: int) -> int:
        return math.ceil(micro_batches / self.grad_accum)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `fit` returns: the trained parameters and how the run went."""

    trainable: Any  # same structure as the `trainable` passed in, fp32
    history: dict[str, list[float]]  # loss, lr, grad_norm per optimizer step; valid_loss per epoch
    steps: int  # optimizer steps done (in all sessions of a resumed run)
    tokens_seen: int  # real target tokens trained on
    seconds: float  # wall time of this call
    finished: bool = True  # False when stopped early by max_steps
    resumed_from: int | None = None  # the checkpoint step this call started from


def hf_linear_lr(step, total_steps: int, config: TrainConfig, xp=jnp):
    """get_linear_schedule_with_warmup: lr·step/warmup, then lr·(total-step)/(total-warmup), floored at 0."""
    warmup = config.warmup_steps
    rise = step / max(warmup, 1)
    fall = (total_steps - step) / max(total_steps - warmup, 1)
    return config.learning_rate * xp.where(step < warmup, rise, xp.maximum(fall, 0.0))


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(max_grad_norm), then AdamW on the linear schedule."""
    adamw = optax.adamw(
        lambda count: hf_linear_lr(count, total_steps, config),
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    if config.max_grad_norm:
        return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
    return adamw


def epoch_batches(
    sequences: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[float]] | None,
    config: TrainConfig,
    *,
    pad_id: int,
    buckets: Sequence[int] | None = None,
) -> BatchesFn:
    """`train_batches_fn` for `fit`: a fresh seeded shuffle every epoch, the same for the same (seed, epoch)."""

    def batches(epoch: int) -> list[Batch]:
        seed = int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0])
        return make_batches(
            sequences, config.batch_size, pad_id=pad_id, loss_masks=loss_masks, buckets=buckets,
            order="shuffle", seed=seed,
        )

    return batches


def cast_for_compute(model: nnx.Module, dtype, mesh: Mesh | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of a copy of `model` computing in `dtype`; `model` itself is left untouched.

    Floating weights are cast (no copy when they already have `dtype`: load the model in the compute
    dtype to save memory). With a mesh, weights not yet on it are placed by the sharding table.
    """
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    if mesh is not None:
        shardings = param_shardings(model, mesh)
        for path, var in flat_params(state).items():
            on_mesh = isinstance(var[...].sharding, NamedSharding) and var[...].sharding.mesh == mesh
            if not on_mesh and path in shardings:
                var.set_value(jax.device_put(var[...], shardings[path]))  # replace, not write into the old array
    compute = nnx.merge(graphdef, state)
    if hasattr(compute, "dtype"):
        compute.dtype = dtype
    embed = getattr(compute, "embed", None)
    if isinstance(embed, nnx.Embed):
        embed.dtype = dtype  # the embedding lookup sets the activations' dtype
    return nnx.split(compute)


def fit(
    model: nnx.Module,
    trainable: Any,
    apply_fn: ApplyFn,
    train_batches_fn: BatchesFn,
    config: TrainConfig,
    *,
    valid_batches: Sequence[Batch] | None = None,
    checkpoint_dir: str | None = None,
    mesh: Mesh | None = None,
    max_steps: int | None = None,
    callback: Callback | None = None,
    constants: Any = None,
) -> TrainResult:
    """Train `trainable` (model frozen) on `train_batches_fn(epoch)` for `config.epochs` epochs.

    With `checkpoint_dir`, state is saved every `checkpoint_every_steps` steps and at every epoch end,
    and a call with the same folder resumes from its latest checkpoint, ending with the same
    parameters as an uninterrupted run. `max_steps` stops after that many optimizer steps in total
    (the schedule still spans all epochs); `callback(step, epoch)` runs after every step.
    `constants` (a pytree of frozen arrays, e.g. RestoreLCC's lost-component basis) is passed to the
    step as an argument and on to `apply_fn(..., constants=constants)`; close over no arrays in
    `apply_fn`, or they are baked into the compiled program.
    Every epoch must yield the same number of micro-batches, each with `batch_size` rows.
    """
    started = time.perf_counter()
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
    first_epoch = list(train_batches_fn(0))
    micro_per_epoch = len(first_epoch)
    if micro_per_epoch == 0:
        raise ValueError("train_batches_fn(0) yielded no batches.")
    _check_rows(first_epoch[0].tokens.shape[0], mesh)
    total_steps = config.epochs * config.steps_per_epoch(micro_per_epoch)
    run_config = {**dataclasses.asdict(config), "micro_batches_per_epoch": micro_per_epoch}

    context = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with context:
        graphdef, frozen = cast_for_compute(model, dtype, mesh)
        trainable = _own_copy(trainable, mesh)
        constants = _place(constants, mesh)
        optimizer, train_step, eval_step = _compiled(graphdef, apply_fn, _step_relevant(config), total_steps)
        opt_state = optimizer.init(trainable)
        progress = TrainProgress(seed=config.seed, config=run_config)
        checkpointer = TrainCheckpointer(checkpoint_dir, config.keep_checkpoints) if checkpoint_dir else None
        resumed_from = None
        if checkpointer is not None and checkpointer.latest_step() is not None:
            resumed_from = checkpointer.latest_step()
            trainable, opt_state, progress = checkpointer.restore(resumed_from, trainable, opt_state)
            _check_same_run(progress.config, run_config)
            log.info("resuming from step %d (epoch %d, micro-batch %d) in %s", progress.step,
                     progress.epoch, progress.micro_batch, checkpoint_dir)

        stack_sharding = _batch_sharding(mesh, leading=1)
        state = _Loop(trainable, opt_state, progress)

        try:
            _run_epochs(
                state, config, total_steps, micro_per_epoch, first_epoch, train_batches_fn, (frozen, constants),
                train_step, eval_step, valid_batches, stack_sharding, mesh, checkpointer, max_steps, callback,
            )
        finally:
            if checkpointer is not None:
                checkpointer.close()

    progress = state.progress
    finished = progress.step >= total_steps
    seconds = time.perf_counter() - started
    log.info("trained %d/%d steps, %d target tokens, in %.1f s%s", progress.step, total_steps,
             progress.tokens_seen, seconds, "" if finished else " (stopped early)")
    return TrainResult(
        trainable=state.trainable,
        history={k: list(v) for k, v in progress.history.items()},
        steps=progress.step,
        tokens_seen=progress.tokens_seen,
        seconds=seconds,
        finished=finished,
        resumed_from=resumed_from,
    )


def evaluate(
    model: nnx.Module,
    trainable: Any,
    apply_fn: ApplyFn,
    batches: Sequence[Batch],
    *,
    compute_dtype: Literal["bfloat16", "float32"] = "float32",
    mesh: Mesh | None = None,
    constants: Any = None,
) -> float:
    """Mean next-token NLL over all target tokens of `batches` (the trainer's validation loss)."""
    dtype = jnp.bfloat16 if compute_dtype == "bfloat16" else jnp.float32
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        graphdef, frozen = cast_for_compute(model, dtype, mesh)
        step = _eval_step(graphdef, apply_fn)
        frozen = (frozen, _place(constants, mesh))
        return _evaluate(step, frozen, _own_copy(trainable, mesh), batches, mesh)


# ---------------------------------------------------------------------------------------- internals


@dataclasses.dataclass
class _Loop:
    trainable: Any
    opt_state: Any
    progress: TrainProgress


def _run_epochs(
    state: _Loop, config: TrainConfig, total_steps: int, micro_per_epoch: int, first_epoch: list[Batch],
    train_batches_fn: BatchesFn, frozen, train_step, eval_step, valid_batches, stack_sharding, mesh,
    checkpointer: TrainCheckpointer | None, max_steps: int | None, callback: Callback | None,
) -> None:
    p = state.progress
    metrics = _PendingMetrics(p.history, config.log_every, lambda s: float(hf_linear_lr(s, total_steps, config, np)))
    stop_at = total_steps if max_steps is None else min(max_steps, total_steps)

    def save():
        if checkpointer is not None:
            metrics.flush()
            checkpointer.save(state.trainable, state.opt_state, p)

    def run_steps(batches: list[Batch]) -> bool:
        """Steps over the rest of this epoch's micro-batches; False when stopped by max_steps."""
        metas: collections.deque = collections.deque()  # host-side counts, in step order

        def arrays_only(groups):
            for arrays, *meta in groups:
                metas.append(meta)
                yield arrays

        groups = _step_groups(batches[p.micro_batch :], config.grad_accum)
        for arrays in prefetch(arrays_only(groups), 2, stack_sharding):
            num_micro, targets, tokens = metas.popleft()
            state.trainable, state.opt_state, out = train_step(frozen, state.trainable, state.opt_state, arrays)
            metrics.push(out, p.step, tokens)
            p.step, p.micro_batch, p.tokens_seen = p.step + 1, p.micro_batch + num_micro, p.tokens_seen + targets
            if callback is not None:
                callback(p.step, p.epoch)
            if p.micro_batch >= micro_per_epoch:
                return True
            if p.step >= stop_at:
                save()
                return False
            if p.step % config.checkpoint_every_steps == 0:
                save()
        return True

    def end_epoch(steps_in_epoch: int) -> None:
        metrics.flush()
        train_loss = float(np.mean(p.history["loss"][-steps_in_epoch:]))
        if valid_batches and (config.eval_every_epoch or p.epoch + 1 == config.epochs):
            loss = _evaluate(eval_step, frozen, state.trainable, valid_batches, mesh)
            p.history["valid_loss"].append(loss)
            log.info("epoch %d/%d: train loss %.4f, valid loss %.4f", p.epoch + 1, config.epochs, train_loss, loss)
        else:
            log.info("epoch %d/%d: train loss %.4f", p.epoch + 1, config.epochs, train_loss)
        p.epoch, p.micro_batch = p.epoch + 1, 0
        save()

    with bar(total=total_steps, initial=p.step, desc="train", unit="step") as progress_bar:
        metrics.bar = progress_bar
        while p.epoch < config.epochs and p.step < stop_at:
            batches = first_epoch if p.epoch == 0 else list(train_batches_fn(p.epoch))
            if len(batches) != micro_per_epoch:
                raise ValueError(
                    f"epoch {p.epoch} has {len(batches)} micro-batches but epoch 0 had {micro_per_epoch}; "
                    "train_batches_fn must yield the same number every epoch."
                )
            if not run_steps(batches):
                break
            end_epoch(config.steps_per_epoch(micro_per_epoch))
        metrics.flush()


class _PendingMetrics:
    """Per-step metrics fetched one step late, so the host never waits on the step just dispatched."""

    def __init__(self, history: dict[str, list[float]], log_every: int, lr_at: Callable[[int], float]):
        self.history, self.log_every, self.lr_at = history, log_every, lr_at
        self.pending: list[tuple[int, dict, int]] = []
        self.bar = None
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def push(self, out: dict, step: int, tokens: int) -> None:
        self.pending.append((step, out, tokens))
        while len(self.pending) > 1:
            self._fetch(*self.pending.pop(0))

    def flush(self) -> None:
        while self.pending:
            self._fetch(*self.pending.pop(0))

    def _fetch(self, step: int, out: dict, tokens: int) -> None:
        values = jax.device_get(out)
        self.history["loss"].append(float(values["loss"]))
        self.history["lr"].append(self.lr_at(step))
        self.history["grad_norm"].append(float(values["grad_norm"]))
        self.window_tokens += tokens
        done = step + 1
        if self.bar is not None:
            self.bar.update(1)
        if done % self.log_every == 0:
            now = time.perf_counter()
            rate = self.window_tokens / max(now - self.window_start, 1e-9)
            recent = self.history["loss"][-self.log_every :]
            loss = sum(recent) / len(recent)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
            log.info("step %d: loss %.4f, lr %.3g, grad norm %.3g, %.0f tokens/s", done, loss,
                     self.history["lr"][-1], float(values["grad_norm"]), rate)
            self.window_tokens, self.window_start = 0, now


def _step_groups(batches: Sequence[Batch], accum: int) -> Iterator[tuple[dict, int, int, int]]:
    """(arrays (accum, batch, seq), micro-batches used, target tokens, real tokens) per optimizer step.

    A short last group is completed with all-filler micro-batches (no targets), so every step has
    `accum` micro-batches and the shape set stays the bucket set.
    """
    for start in range(0, len(batches), accum):
        group = list(batches[start : start + accum])
        rows = group[0].tokens.shape[0]
        if any(b.tokens.shape[0] != rows for b in group):
            raise ValueError("all micro-batches must have the same number of rows (make_batches(fill_last=True)).")
        seq = max(b.tokens.shape[1] for b in group)
        tokens = np.zeros((accum, rows, seq), np.int32)
        attention = np.zeros((accum, rows, seq), np.int32)
        attention[:, :, 0] = 1  # filler micro-batches: one visible key, no NaN
        loss = np.zeros((accum, rows, seq), np.float32)
        for i, b in enumerate(group):
            width = b.tokens.shape[1]
            tokens[i, :, :width] = b.tokens
            attention[i, :, :width] = b.attention_mask
            loss[i, :, :width] = b.attention_mask if b.loss_mask is None else b.loss_mask
        targets = int(np.sum(loss[:, :, 1:] * attention[:, :, 1:]))
        arrays = {"tokens": tokens, "attention_mask": attention, "loss_mask": loss}
        yield arrays, len(group), targets, int(attention.sum())


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


def _check_same_run(saved: dict, current: dict) -> None:
    changed = {
        k: (saved.get(k), v) for k, v in current.items()
        if k not in _RESUMABLE_CHANGES and saved.get(k) != v
    }
    if changed:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ValueError(
            f"the checkpoint folder holds a different run ({detail}); use a new checkpoint_dir "
            "or the original settings."
        )
