"""Packed training rows are the same training data: loss AND gradients w.r.t. the compensation (β, b).

`pack_batch` puts a micro-batch's samples back to back into a few rows with segment-id attention
(positions restarting per sample). tests/test_performance.py checks its logits and loss against padded
rows; here the RestoreLCC trainable itself is differentiated (δ = Vᵀβ + b on the selected heads, added
at every token of those heads, padding and other packed samples included), on three layouts of the
same samples:

  * per sample: each sample unpadded in a row of its own (what the reference's model sees, padding aside);
  * padded: one right-padded batch (the trainer with pack=False);
  * packed: pack_batch into two rows rounded up to a multiple (trailing padding), directly; and into one
    row through `fit` itself (its layout without a mesh).

All in fp32 with HIGHEST matmul precision, so they agree to ~1e-6. A negative check shows the test is not
vacuous: the packed rows read with a plain 0/1 mask (no segment separation) give a clearly different loss
and gradient. (Positions that fail to restart per sample would NOT show here: with segment-local
attention, RoPE scores depend only on relative positions, so an offset per segment changes nothing
beyond rounding.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcc_jax.data.batching import make_batches, pack_batch
from lcc_jax.models.attention import packed_rows
from lcc_jax.restore.compensation import init_compensation, split_trainable
from lcc_jax.restore.pipeline import _apply_compensation
from lcc_jax.train import TrainConfig, fit
from model_utils import SMALL_CONFIG, random_model

CONFIG = SMALL_CONFIG  # 2 layers, 4 heads (GQA 2), head_dim 8, vocab 64
RTOL = 2e-6


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=3)


@pytest.fixture(scope="module")
def samples():
    """Six samples of two lengths (few compiled shapes), each a prompt (no loss) then a response (loss)."""
    rng = np.random.default_rng(7)
    seqs, masks = [], []
    for length, prompt in [(13, 9), (7, 2), (13, 6), (7, 4), (13, 3), (7, 5)]:
        seqs.append(rng.integers(1, CONFIG.vocab_size, length).tolist())
        masks.append([0.0] * prompt + [1.0] * (length - prompt))
    return seqs, masks


@pytest.fixture(scope="module")
def compensation():
    """Four heads (one per layer at least), β and b large enough that δ changes the logits noticeably."""
    rng = np.random.RandomState(0)
    d = CONFIG.head_dim
    basis = np.stack([np.linalg.qr(rng.randn(d, d))[0].T for _ in range(CONFIG.total_heads)]).astype(np.float32)
    comp = init_compensation(basis, np.array([6, 1, 3, 4, 0, 2, 5, 7]), 4, jax.random.key(0), std=0.3)
    return split_trainable(comp)


# the check's own computation compiles at XLA's lowest optimisation level: half the compile time, same numbers
@functools.partial(jax.jit, static_argnums=(0, 4), compiler_options={"xla_backend_optimization_level": 0})
def _sum_and_grad(graphdef, state, trainable, frozen, max_segments, tokens, segments, loss_mask):
    """(Σ next-token NLL over the targets, #targets, ∇ of the Σ w.r.t. the trainable), compiled per shape."""

    def total(t):
        with packed_rows(max_segments):
            logits = _apply_compensation(nnx.merge(graphdef, state), t, tokens, segments, constants=frozen)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        weight = loss_mask[:, 1:] * (segments[:, 1:] > 0)  # the target is real and marked
        return -jnp.sum(picked * weight), jnp.sum(weight)

    (nll, count), grads = jax.value_and_grad(total, has_aux=True)(trainable)
    return nll, count, grads


def loss_and_grad(model, trainable, frozen, arrays, max_segments=1):
    """(mean NLL, {"beta", "bias"} gradients) over all targets of `arrays` [(tokens, segment ids, loss mask)]."""
    graphdef, state = nnx.split(model)
    nll, count, grads = 0.0, 0.0, None
    for tokens, segments, loss_mask in arrays:
        s, n, g = _sum_and_grad(graphdef, state, trainable, frozen, max_segments, jnp.asarray(tokens),
                                jnp.asarray(segments), jnp.asarray(loss_mask))
        g = jax.tree.map(lambda x: np.asarray(x, np.float64), g)
        nll, count = nll + float(s), count + float(n)
        grads = g if grads is None else jax.tree.map(np.add, grads, g)
    return nll / count, jax.tree.map(lambda x: x / count, grads)


def per_sample(seqs, masks):
    """Each sample unpadded, alone in its row (rows of equal length share a batch: rows never see each other)."""
    out = []
    for length in sorted({len(x) for x in seqs}):
        rows = [i for i, x in enumerate(seqs) if len(x) == length]
        out.append((np.asarray([seqs[i] for i in rows], np.int32), np.ones((len(rows), length), np.int32),
                    np.asarray([masks[i] for i in rows], np.float32)))
    return out


def padded(seqs, masks, width=16):
    b = make_batches(seqs, len(seqs), pad_id=0, loss_masks=masks, buckets=(width,), order="given")[0]
    return b, [(b.tokens, b.attention_mask, b.loss_mask)]


def assert_same(a, b, rtol=RTOL):
    (loss_a, grad_a), (loss_b, grad_b) = a, b
    np.testing.assert_allclose(loss_a, loss_b, rtol=rtol)
    for name in ("beta", "bias"):
        scale = np.abs(grad_b[name]).max()
        np.testing.assert_allclose(grad_a[name], grad_b[name], rtol=0, atol=rtol * scale, err_msg=name)


def assert_differs(a, b):
    """Far outside assert_same's tolerance: the loss by 20x (a random model's loss moves little), the gradient 1000x."""
    (loss_a, grad_a), (loss_b, grad_b) = a, b
    gap = max(np.abs(grad_a[n] - grad_b[n]).max() / np.abs(grad_b[n]).max() for n in ("beta", "bias"))
    assert abs(loss_a - loss_b) > 20 * RTOL * abs(loss_b) and gap > 1000 * RTOL, (loss_a, loss_b, gap)


def test_packed_rows_give_the_loss_and_compensation_gradients_of_separate_samples(model, samples, compensation):
    """Two packed rows (rounded up to a multiple of 16, so with trailing padding); one row is `fit`'s default
    without a mesh, checked through the trainer below."""
    rows, multiple = 2, 16
    seqs, masks = samples
    trainable, frozen = compensation
    alone = loss_and_grad(model, trainable, frozen, per_sample(seqs, masks))
    batch, arrays = padded(seqs, masks)
    together = loss_and_grad(model, trainable, frozen, arrays)
    packed = pack_batch(batch, rows=rows, multiple=multiple)
    assert packed.tokens.shape[0] == rows and packed.max_segments >= len(seqs) // rows
    assert (packed.attention_mask == 0).any()  # trailing padding in the packed rows too
    packed_arrays = [(packed.tokens, packed.attention_mask, packed.loss_mask)]
    got = loss_and_grad(model, trainable, frozen, packed_arrays, packed.max_segments)

    assert_same(together, alone)  # padding changes nothing
    assert_same(got, alone)  # packing changes nothing
    assert np.abs(alone[1]["beta"]).max() > 1e-4 and np.abs(alone[1]["bias"]).max() > 1e-4  # gradients are real

    # negative: the same packed row without segment separation (samples see each other) ...
    mixed = loss_and_grad(model, trainable, frozen, [(packed.tokens, (packed.attention_mask > 0).astype(np.int32),
                                                      packed.loss_mask)])
    assert_differs(mixed, alone)


def test_trainer_step_on_one_packed_row_equals_separate_samples(model, samples, compensation):
    """`fit` itself (without a mesh it packs each micro-batch into one row): its first step's loss and gradient
    norm are the per-sample ones, and so are its updated β, b (one AdamW step: -lr·g/(|g| + ε))."""
    seqs, masks = samples
    trainable, frozen = compensation
    lr = 1e-2
    config = TrainConfig(learning_rate=lr, epochs=1, batch_size=6, compute_dtype="float32", max_grad_norm=None)
    whole = lambda epoch: make_batches(seqs, 6, pad_id=0, loss_masks=masks, buckets=(16,), order="given")  # noqa: E731
    packed = fit(model, trainable, _apply_compensation, whole, config, constants=frozen, pack_multiple=64)
    alone_loss, alone_grad = loss_and_grad(model, trainable, frozen, per_sample(seqs, masks))
    norm = float(np.sqrt(sum(np.sum(g**2) for g in alone_grad.values())))
    assert packed.steps == 1
    np.testing.assert_allclose(packed.history["loss"], [alone_loss], rtol=RTOL)
    np.testing.assert_allclose(packed.history["grad_norm"], [norm], rtol=5 * RTOL)
    for name in ("beta", "bias"):
        g = alone_grad[name]
        step = np.asarray(packed.trainable[name], np.float64) - np.asarray(trainable[name], np.float64)
        clear = np.abs(g) > 1e-4 * np.abs(g).max()  # where the sign of g is beyond rounding
        np.testing.assert_allclose(step[clear], (-lr * g / (np.abs(g) + 1e-8))[clear], rtol=1e-4, atol=1e-8)
        assert np.all(np.abs(step) <= lr * (1 + 1e-5))
