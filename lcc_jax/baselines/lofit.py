"""LoFiT (Yin, Ye & Durrett, NeurIPS 2024): localised fine-tuning of attention-head representations.

As the reference code (github.com/fc2869/lo-fit, `models/modeling_llama.py`, `lofit_trainer.py`),
head h's output z_h (the o_proj input, the same place as RestoreLCC's door) becomes (1 + A_h) ⊙ z_h + v_h:

1. Head selection: train only the scaling offsets A (every head, A ~ N(0, 1e-3), v = 0) on
   next-token loss + λ·‖A‖₁ (L1 over all of A); score each head by ‖A_h‖₂ and keep the top k.
2. Bias tuning: a fresh model (A = 0), train only v_h on the k selected heads (v ~ N(0, 1e-3), no L1).
   Here v is a bias-only `Compensation` on those heads (`bias_only.head_bias`), trained through the
   compensation door and folded into o_proj's bias afterwards exactly like RestoreLCC.

The scaling has no door of its own: (1 + A) ⊙ z before o_proj equals scaling o_proj's input rows, so
step 1 runs the model with W_o' = diag(1 + A) W_o (`kernels.with_kernels`). With bf16 compute W_o' is
rounded to bf16, so offsets far below 2⁻⁸ barely move the forward pass (their gradients still add
up). The reference trains 7B models in fp32; for 13B and Gemma it trains in bf16 and forms A + 1 in
bf16, which rounds more coarsely still. Use compute_dtype="float32" for the 7B numerics.

The shared trainer minimises the token-mean NLL of its logits and has no regulariser hook. The L1
term therefore enters through a custom VJP on the logits: the backward pass adds λ·sign(A)·n to A's
gradient, n = the micro-batch's target tokens (the rows of the logits' cotangent that are non-zero).
The trainer divides each step's gradient sum by the step's targets, so the step gradient is that of
mean NLL + λ‖A‖₁: LoFiT's loss (its HF Trainer adds λ‖A‖₁ to each batch's mean loss). This relies on
0/1 loss masks, which the data pipeline produces; the logged loss is the NLL alone.

Defaults: the reference's A init, v init and λ = 1e-3 (Llama-2-7B MQuAKE script; 5e-4 TruthfulQA,
5e-3 CLUTRR); k = 25 % of heads, RestoreLCC's budget (LoFiT uses 3-5 %: `LOFIT_REFERENCE`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcc_jax.baselines.bias_only import head_bias, train_compensation
from lcc_jax.baselines.kernels import O_PROJ, with_kernels
from lcc_jax.config import ModelConfig
from lcc_jax.restore.compensation import Compensation
from lcc_jax.restore.top_k import TopK
from lcc_jax.sharding import flat_params
from lcc_jax.train import TrainConfig, TrainResult, fit

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LofitConfig:
    """LoFiT's settings; learning rates of None keep the TrainConfig's (the shared RestoreLCC budget)."""

    top_k: TopK | int | float | str = 0.25  # heads for the bias step: a count or a fraction of all L·H heads
    l1_lambda: float = 1e-3  # λ of the selection step's λ·‖A‖₁
    init_std: float = 1e-3  # A and v ~ N(0, init_std)
    select_learning_rate: float | None = None
    bias_learning_rate: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "top_k", TopK.parse(self.top_k))
        if self.l1_lambda < 0 or self.init_std < 0:
            raise ValueError(f"bad LoFiT config {self}.")


# The reference's Llama-2-7B MQuAKE run: 32 heads, selection lr 5e-3, bias lr 1e-2 (both 5 epochs, batch 8).
LOFIT_REFERENCE = LofitConfig(top_k=32, l1_lambda=1e-3, select_learning_rate=5e-3, bias_learning_rate=1e-2)


@dataclasses.dataclass(frozen=True)
class HeadSelection:
    """The outcome of LoFiT's first step."""

    scale: np.ndarray  # (layers, heads, head_dim): the trained offsets A of (1 + A)
    scores: np.ndarray  # (layers, heads): ‖A_h‖₂
    ranking: np.ndarray  # (L·H,) head indices l·H + h, best first
    heads: np.ndarray  # (k,) the selected heads, best first
    train: TrainResult | None = None


@dataclasses.dataclass(frozen=True)
class LofitResult:
    compensation: Compensation  # v on the selected heads (mode "bias_only"): fold with merge.merge_head_vectors
    selection: HeadSelection
    train: TrainResult  # the bias step


def init_head_scaling(config: ModelConfig, key: jax.Array, *, std: float = 1e-3) -> dict[str, jax.Array]:
    """{"scale": (layers, heads, head_dim) A ~ N(0, std)}: the trainable of the selection step."""
    shape = (config.num_layers, config.num_heads, config.head_dim)
    return {"scale": std * jax.random.normal(key, (int(np.prod(shape)),), jnp.float32).reshape(shape)}


def scaled_o_proj(w: jax.Array, scale: jax.Array) -> jax.Array:
    """W_o (layers, heads·head_dim, embed) with input row (h, i) multiplied by 1 + A[l, h, i]; w's dtype."""
    layers = w.shape[0]
    factor = 1.0 + scale.astype(jnp.float32).reshape(layers, -1, 1)  # (layers, heads·head_dim, 1)
    return (w.astype(jnp.float32) * factor).astype(w.dtype)


def apply_head_scaling(model, trainable, tokens, mask, *, constants, remat: bool = False):
    """The `fit` apply_fn of the selection step; constants = {"l1_lambda": scalar}."""
    scale = trainable["scale"]  # (layers, heads, head_dim)
    w = flat_params(model)[O_PROJ][...]
    logits = with_kernels(model, {O_PROJ: scaled_o_proj(w, scale)})(tokens, mask, remat=remat).logits
    return _l1_in_backward(logits, scale, jnp.asarray(constants["l1_lambda"], jnp.float32))


@jax.custom_vjp
def _l1_in_backward(logits: jax.Array, scale: jax.Array, lam: jax.Array) -> jax.Array:
    """Identity on logits; the backward pass adds λ·sign(A)·(target tokens) to A's gradient."""
    return logits


def _l1_fwd(logits, scale, lam):
    return logits, (scale, lam)


def _l1_bwd(residual, g):
    scale, lam = residual
    targets = jnp.sum(jnp.any(g != 0, axis=-1), dtype=jnp.float32)  # rows (batch, seq) that carry loss
    return g, (lam * targets * jnp.sign(scale)).astype(scale.dtype), jnp.zeros_like(lam)


_l1_in_backward.defvjp(_l1_fwd, _l1_bwd)


def rank_heads(scale: jax.Array | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores (layers, heads) = ‖A_h‖₂, ranking (L·H,) best first; ties: lower index first)."""
    a = np.asarray(scale, np.float32)
    scores = np.linalg.norm(a, axis=-1)
    return scores, np.argsort(-scores.ravel(), kind="stable")


def select_heads(model: nnx.Module, train_batches_fn, train_config: TrainConfig, config: LofitConfig,
                 key: jax.Array, **fit_kwargs: Any) -> HeadSelection:
    """LoFiT step 1: train A with the L1 penalty, keep the `config.top_k` heads of largest ‖A_h‖₂."""
    if config.select_learning_rate is not None:
        train_config = dataclasses.replace(train_config, learning_rate=config.select_learning_rate)
    trainable = init_head_scaling(model.config, key, std=config.init_std)
    result = fit(model, trainable, apply_head_scaling, train_batches_fn, train_config,
                 constants={"l1_lambda": jnp.float32(config.l1_lambda)}, **fit_kwargs)
    scale = np.asarray(jax.device_get(result.trainable["scale"]))
    scores, ranking = rank_heads(scale)
    k = config.top_k.resolve(model.config.total_heads)
    log.info("LoFiT selected %d of %d heads (top score %.3g)", k, ranking.size, scores.ravel()[ranking[0]])
    return HeadSelection(scale=scale, scores=scores, ranking=ranking, heads=ranking[:k], train=result)


def train_lofit(model: nnx.Module, train_batches_fn, train_config: TrainConfig, config: LofitConfig,
                key: jax.Array, *, checkpoint_dir: str | None = None, **fit_kwargs: Any) -> LofitResult:
    """Both LoFiT steps with the shared trainer (checkpoints, when asked, in checkpoint_dir/{select,bias})."""
    select_key, bias_key = jax.random.split(key)
    sub = (lambda name: None) if checkpoint_dir is None else (lambda name: os.path.join(checkpoint_dir, name))
    selection = select_heads(model, train_batches_fn, train_config, config, select_key,
                             checkpoint_dir=sub("select"), **fit_kwargs)
    if config.bias_learning_rate is not None:
        train_config = dataclasses.replace(train_config, learning_rate=config.bias_learning_rate)
    comp = head_bias(selection.heads, model.config, bias_key, std=config.init_std)
    trained, result = train_compensation(model, comp, train_batches_fn, train_config,
                                         checkpoint_dir=sub("bias"), **fit_kwargs)
    return LofitResult(compensation=trained, selection=selection, train=result)


def num_selection_params(config: ModelConfig) -> int:
    """Trainable parameters of the selection step: L·H·head_dim (the bias step has k·head_dim)."""
    return config.num_layers * config.num_heads * config.head_dim
