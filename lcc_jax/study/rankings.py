"""Other ways to rank heads for compensation, against which the contrastive probe is measured.

* gradient: the norm of the training loss's gradient with respect to a per-head vector added at the
  o_proj input, at zero (how much a small compensation of that head would lower the loss first);
* lofit: LoFiT's learned-scaling step (`baselines.lofit.select_heads`), ‖A_h‖₂;
* random: a seeded permutation;
* by layer (`restore.probe.spread_over_layers`, also `RestoreConfig.spread_heads`): any ranking re-ordered so that
  a top-k takes each layer's best heads in turn.
  The probes never choose heads in the first third of the layers (SmolLM2 and Qwen2.5-1.5B, README), while
  LoFiT's, the gradient's and random heads start at layer 0; this ranking tests whether that is what holds the
  probe back.
Every ranking is (L·H,) head indices l·H + h, best first, as `ProbeResult.ranking`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcc_jax.data.batching import Batch, prefetch
from lcc_jax.train.losses import next_token_nll

log = logging.getLogger(__name__)


def gradient_ranking(model: nnx.Module, batches: Sequence[Batch]) -> tuple[np.ndarray, np.ndarray]:
    """(scores (layers, heads): ‖∂ mean NLL / ∂ δ_h‖₂ at δ = 0 over `batches`, ranking best first)."""
    c = model.config
    graphdef, state = nnx.split(model)
    zero = jnp.zeros((c.num_layers, c.num_heads, c.head_dim), jnp.float32)

    @jax.jit
    def grad_sum(state, tokens, attention_mask, loss_mask):
        def loss(delta):
            logits = nnx.merge(graphdef, state)(tokens, attention_mask, compensation=delta).logits
            return next_token_nll(logits, tokens, loss_mask, attention_mask)  # (sum, count)

        (_, n), g = jax.value_and_grad(loss, has_aux=True)(zero)
        return g, n

    total, count = np.zeros(zero.shape, np.float64), 0.0
    for b in prefetch(batches, 2):
        loss_mask = b.attention_mask.astype(jnp.float32) if b.loss_mask is None else b.loss_mask
        g, n = jax.device_get(grad_sum(state, b.tokens, b.attention_mask, loss_mask))
        total += g
        count += float(n)
    scores = np.linalg.norm(total / max(count, 1.0), axis=-1)
    ranking = np.argsort(-scores.ravel(), kind="stable")
    log.info("gradient ranking over %d batches (%d targets): top head %d, score %.3g", len(batches), count,
             ranking[0], scores.ravel()[ranking[0]])
    return scores, ranking


def random_ranking(total_heads: int, seed: int) -> np.ndarray:
    """A seeded random order of all heads."""
    return np.random.default_rng(seed).permutation(total_heads)
