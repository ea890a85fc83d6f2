"""Check, on the device, that the fast attention paths compute what the plain one does.

On a two-layer bf16 model of the shape: the training loss and its gradient with respect to a
compensation, for one batch of the reference's training samples, through cuDNN packed rows, cuDNN
right-padded rows and XLA packed rows, each against XLA on right-padded rows. Relative errors of
bf16 size (~1e-2 or less) say the paths agree; on a CPU every path is XLA and the errors are ~0.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import Shape, data, random_model
from lcc_jax.data.batching import make_batches, pack_batch
from lcc_jax.models.attention import attention_implementation, packed_rows
from lcc_jax.train.losses import next_token_nll


def attention_check(shape: Shape, batch_size: int = 8, seed: int = 0, min_len: int = 120,
                    max_len: int = 500) -> dict[str, float]:
    """{"<impl>_<layout>": max(relative loss error, relative gradient error)} against XLA on padded rows."""
    small = dataclasses.replace(shape, num_layers=2)
    graphdef, state = nnx.split(random_model(small, seed=seed))
    samples = data.training_samples(batch_size, shape.vocab_size, seed, min_len, max_len)
    sequences = [s.ids.astype(np.int32) for s in samples]
    masks = [np.r_[np.zeros(s.prompt_len), np.ones(len(s) - s.prompt_len)].astype(np.float32) for s in samples]
    padded = make_batches(sequences, batch_size, pad_id=0, loss_masks=masks, order="given")[0]
    packed = pack_batch(padded, rows=1, multiple=256)
    delta = 0.05 * jax.random.normal(jax.random.key(seed), (2, shape.num_heads, shape.head_dim), jnp.float32)

    def loss_and_grad(impl: str, batch, segments: int):
        def loss(d):
            context = packed_rows(segments) if segments > 1 else contextlib.nullcontext()
            with attention_implementation(impl), context:
                model = nnx.merge(graphdef, state)
                logits = model(batch.tokens, batch.attention_mask, compensation=d.astype(jnp.bfloat16)).logits
            total, count = next_token_nll(logits, batch.tokens, batch.loss_mask, batch.attention_mask)
            return total / count

        value, grad = jax.jit(jax.value_and_grad(loss))(delta)
        return float(value), np.asarray(grad, np.float64)

    ref_loss, ref_grad = loss_and_grad("xla", padded, 1)
    out = {}
    for impl, batch, segments, name in (("cudnn", packed, batch_size, "cudnn_packed"),
                                        ("cudnn", padded, 1, "cudnn_padded"), ("xla", packed, batch_size, "xla_packed")):
        value, grad = loss_and_grad(impl, batch, segments)
        loss_error = abs(value - ref_loss) / abs(ref_loss)
        grad_error = float(np.linalg.norm(grad - ref_grad) / max(np.linalg.norm(ref_grad), 1e-30))
        out[name] = max(loss_error, grad_error) if np.isfinite(value) and np.all(np.isfinite(grad)) else float("nan")
    return out
