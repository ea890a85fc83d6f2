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

    def apply_fn(model, trainable, tokens, mask, *, constants, remat=False, stop_backward_at=0):
        delta = to_dense(trainable, constants, model.config)  # (layers, heads, head_dim)
        return model(tokens, mask, compensation=delta, remat=remat, stop_backward_at=stop_backward_at).logits

    fit(model, trainable, apply_fn, epoch_batches(seqs, masks, config, pad_id=pad), config, constants=frozen,
        stop_backward_at=lowest_layer(frozen, model.config))  # no backward pass below the lowest compensated layer
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lcc_jax.data.batching import Batch, make_batches
from lcc_jax.data.device import prefetch_with
from lcc_jax.progress import bar
from lcc_jax.train.ahead import BatchesFn, cast_for_compute, compute_dtype, plan_fit, step_table
from lcc_jax.train.config import _RESUMABLE_CHANGES, TrainConfig, TrainResult, hf_linear_lr
from lcc_jax.train.state import TrainCheckpointer, TrainProgress
from lcc_jax.train.steps import (
    ApplyFn,
    StepTable,
    _compiled,
    _eval_step,
    _evaluate,
    _own_copy,
    _place,
    _step_groups,
    init_state,
)

log = logging.getLogger(__name__)

Callback = Callable[[int, int], None]  # (optimizer steps done, epoch) after every step; raising aborts


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
    pack: bool = True,
    pack_multiple: int | None = None,
    stop_backward_at: int = 0,
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
    `pack` puts each micro-batch's samples back to back into one row per batch shard of the mesh
    (`pack_batch`, rows a multiple of `pack_multiple` long; by default the finest multiple that keeps
    the first epoch within six row lengths, i.e. six compilations): the same samples and loss,
    computed on real tokens instead of padding. `apply_fn` then receives segment ids as its
    attention mask and must hand them to the model unchanged (every apply_fn in lcc_jax does).
    The train step is compiled for every epoch's batch shapes at once before training (later epochs are
    reshuffled and may pack to other row lengths; a compile mid-training would stall it).
    `stop_backward_at` > 0: the lowest layer where `trainable` enters the model (for a compensation,
    `restore.compensation.lowest_layer`); apply_fn receives it as `stop_backward_at=` and the model runs
    the layers below it forward only, with no backward pass (same loss and gradients, less work).
    """
    started = time.perf_counter()
    plan = plan_fit(train_batches_fn, config, mesh, pack, pack_multiple)
    first_epoch, micro_per_epoch, total_steps = plan.first_epoch, plan.micro_per_epoch, plan.total_steps
    run_config = {**dataclasses.asdict(config), "micro_batches_per_epoch": micro_per_epoch}

    context = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with context:
        graphdef, frozen = cast_for_compute(model, compute_dtype(config), mesh)
        trainable = _own_copy(trainable, mesh, jnp.dtype(config.param_dtype))
        constants = _place(constants, mesh)
        optimizer = _compiled(graphdef, apply_fn, plan.step_config, total_steps, plan.max_segments, None,
                              stop_backward_at)[0]
        opt_state = init_state(optimizer, trainable)
        progress = TrainProgress(seed=config.seed, config=run_config)
        checkpointer = TrainCheckpointer(checkpoint_dir, config.keep_checkpoints) if checkpoint_dir else None
        resumed_from = None
        if checkpointer is not None and checkpointer.latest_step() is not None:
            resumed_from = checkpointer.latest_step()
            trainable, opt_state, progress = checkpointer.restore(resumed_from, trainable, opt_state)
            _check_same_run(progress.config, run_config)
            log.info("resuming from step %d (epoch %d, micro-batch %d) in %s", progress.step,
                     progress.epoch, progress.micro_batch, checkpoint_dir)
        stack_sharding = plan.stack_sharding
        steps, eval_step = step_table(graphdef, (frozen, constants), trainable, opt_state, apply_fn, plan, mesh,
                                       stop_backward_at)
        state = _Loop(trainable, opt_state, progress)

        try:
            _run_epochs(
                state, config, total_steps, micro_per_epoch, first_epoch, train_batches_fn, (frozen, constants),
                steps, eval_step, valid_batches, stack_sharding, mesh, checkpointer, max_steps, callback,
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
    train_batches_fn: BatchesFn, frozen, steps: StepTable, eval_step, valid_batches, stack_sharding, mesh,
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
        groups = _step_groups(batches[p.micro_batch :], config.grad_accum, steps.rows, steps.multiple)
        for (num_micro, targets, tokens), arrays in prefetch_with(((m, a) for a, *m in groups), stack_sharding):
            state.trainable, state.opt_state, out = steps(frozen, state.trainable, state.opt_state, arrays)
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
    """Per-step metrics kept on the device and fetched every `log_every` steps, never the step just dispatched."""

    def __init__(self, history: dict[str, list[float]], log_every: int, lr_at: Callable[[int], float]):
        self.history, self.log_every, self.lr_at = history, log_every, lr_at
        self.pending: list[tuple[int, dict, int]] = []
        self.bar = None
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def push(self, out: dict, step: int, tokens: int) -> None:
        """Queue a step's device-side metrics; fetch them (one transfer) once `log_every` steps wait."""
        self.pending.append((step, out, tokens))
        if len(self.pending) > self.log_every:
            self._fetch_all(self.pending[:-1])  # the step just dispatched keeps running meanwhile
            self.pending = self.pending[-1:]

    def flush(self) -> None:
        self._fetch_all(self.pending)
        self.pending = []

    def _fetch_all(self, entries: list[tuple[int, dict, int]]) -> None:
        values = jax.device_get([out for _, out, _ in entries])
        for (step, _, tokens), fetched in zip(entries, values):
            self._record(step, fetched, tokens)
        if self.bar is not None and entries:
            self.bar.update(len(entries))  # at once: steps fetched together were done by now, not one by one

    def _record(self, step: int, values: dict, tokens: int) -> None:
        self.history["loss"].append(float(values["loss"]))
        self.history["lr"].append(self.lr_at(step))
        self.history["grad_norm"].append(float(values["grad_norm"]))
        self.window_tokens += tokens
        done = step + 1
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
