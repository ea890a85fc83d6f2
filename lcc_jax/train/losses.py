"""Next-token cross-entropy on masked targets, as sums and counts so that batches average by token.

Hugging Face causal-LM losses are the mean over non-ignored target tokens of a (micro)batch; with
gradient accumulation, transformers >= 4.46 divides the summed loss by the target tokens of the whole
accumulated batch. Returning (sum, count) lets the trainer do exactly that: one optimizer step's
loss is sum over its micro-batches / their total target count, so `grad_accum=2` at batch 4 gives
the gradient of batch 8.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_nll(
    logits: jax.Array,  # (batch, seq, vocab), any float dtype
    tokens: jax.Array,  # (batch, seq) int
    loss_mask: jax.Array,  # (batch, seq) float: 1 where the token there is a target
    attention_mask: jax.Array | None = None,  # (batch, seq): targets must also be real tokens (> 0; segment ids ok)
) -> tuple[jax.Array, jax.Array]:
    """(sum of NLL over targets, number of targets), both fp32 scalars.

    Position t's logits predict token t+1; token t+1 counts when loss_mask[t+1] is 1 (the mask is on
    the label side, as trl's labels are). The log-softmax is fp32 whatever the logits' dtype; XLA fuses
    the upcast into the reductions, so no fp32 copy of the (batch, seq, vocab) logits is stored.
    For packed rows the loss mask must be 0 on each sequence's first token (`pack_batch` does that).
    """
    weight = loss_mask[:, 1:].astype(jnp.float32)  # (batch, seq-1)
    if attention_mask is not None:
        weight = weight * (attention_mask[:, 1:] > 0).astype(jnp.float32)
    logits = logits[:, :-1].astype(jnp.float32)  # (batch, seq-1, vocab)
    targets = tokens[:, 1:]  # (batch, seq-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked  # (batch, seq-1)
    return jnp.sum(nll * weight), jnp.sum(weight)


def mean_next_token_nll(logits, tokens, loss_mask, attention_mask=None) -> jax.Array:
    """Mean NLL over the batch's targets (HF's loss for one batch); 0 when there are none."""
    total, count = next_token_nll(logits, tokens, loss_mask, attention_mask)
    return total / jnp.maximum(count, 1.0)
