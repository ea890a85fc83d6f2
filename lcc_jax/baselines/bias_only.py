"""Per-head bias vectors at the o_proj input: the bias-only ablation, and the apply_fn of every compensation.

Bias-only is RestoreLCC without the β·V term: δ_h = b_h on the top-k heads of the probe ranking,
b ~ N(0, 1e-3). That is exactly `restore.compensation` with mode="bias_only" (β frozen at 0), so
this module only adds conveniences that need no lost-component basis: `head_bias` puts trainable
biases on any heads (LoFiT's bias step uses it on its own heads), `init_bias_only` on the best
`top_k` of a ranking, drawing the same biases as `init_compensation(..., mode="bias_only")` with
the same key. Trainable count: k · head_dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcc_jax.config import ModelConfig
from lcc_jax.restore.compensation import (
    Compensation,
    check_heads,
    lowest_layer,
    merge_trainable,
    split_trainable,
    to_dense,
)
from lcc_jax.restore.top_k import TopK
from lcc_jax.train import TrainConfig, TrainResult, fit


def head_bias(heads, config: ModelConfig, key: jax.Array, *, std: float = 1e-3) -> Compensation:
    """A bias-only Compensation on `heads` (indices l·H + h): b ~ N(0, std), β = 0 and frozen.

    Its basis is zeros (it multiplies β = 0, so it is never used).
    """
    heads = jnp.asarray(np.asarray(heads), jnp.int32)
    k, d = int(heads.shape[0]), config.head_dim
    _, _, bias_key = jax.random.split(key, 3)  # init_compensation's split: same key, same biases
    comp = Compensation(
        basis=jnp.zeros((k, d, d), jnp.float32),
        beta=jnp.zeros((k, d), jnp.float32),
        bias=std * jax.random.normal(bias_key, (k * d,), jnp.float32).reshape(k, d),  # = a (k, d) draw
        heads=heads,
        mode="bias_only",
    )
    check_heads(comp, config)
    return comp


def init_bias_only(head_ranking, top_k: TopK | int | float | str, config: ModelConfig, key: jax.Array, *,
                   std: float = 1e-3) -> Compensation:
    """Bias-only compensation on the best `top_k` heads (a count or a fraction) of `head_ranking`."""
    ranking = np.asarray(head_ranking)
    if sorted(ranking.tolist()) != list(range(config.total_heads)):
        raise ValueError(f"head_ranking must be a permutation of the {config.total_heads} head indices.")
    return head_bias(ranking[: TopK.parse(top_k).resolve(config.total_heads)], config, key, std=std)


def apply_compensation(model, trainable, tokens, mask, *, constants: Compensation, remat: bool = False,
                       stop_backward_at: int = 0):
    """The `fit` apply_fn of any Compensation (RestoreLCC, bias-only, LoFiT's bias step)."""
    delta = to_dense(trainable, constants, model.config)  # (layers, heads, head_dim)
    return model(tokens, mask, compensation=delta.astype(model.dtype), remat=remat,
                 stop_backward_at=stop_backward_at).logits


def train_compensation(model, comp: Compensation, train_batches_fn, config: TrainConfig,
                       **fit_kwargs: Any) -> tuple[Compensation, TrainResult]:
    """Train what `comp.mode` makes trainable with the shared trainer; (trained Compensation, TrainResult)."""
    trainable, frozen = split_trainable(comp)
    fit_kwargs.setdefault("stop_backward_at", lowest_layer(comp, model.config))
    result = fit(model, trainable, apply_compensation, train_batches_fn, config, constants=frozen, **fit_kwargs)
    return merge_trainable(result.trainable, frozen), result
