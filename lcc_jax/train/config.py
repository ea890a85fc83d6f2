"""Training hyper-parameters, the run's result, and the optimizer they define (shared by RestoreLCC and the baselines)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax.numpy as jnp
import optax

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
    # the trainable parameters, their gradients and AdamW's moments: float32 (lcc_jax) or bfloat16 (the reference
    # RestoreLCC code, which loads the model in bf16 and trains its compensation there)
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: bool = False  # recompute each layer in the backward pass (passed to apply_fn)
    log_every: int = 10  # optimizer steps between log lines
    checkpoint_every_steps: int = 200  # plus one at every epoch end
    keep_checkpoints: int = 2

    def __post_init__(self):
        if self.compute_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"compute_dtype must be 'bfloat16' or 'float32', not {self.compute_dtype!r}.")
        if self.param_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"param_dtype must be 'bfloat16' or 'float32', not {self.param_dtype!r}.")
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
