"""lcc_jax's trainer steps = the reference's optimizer stack, written out with torch.

The reference trains with Hugging Face's Trainer: torch.optim.AdamW, get_linear_schedule_with_warmup,
clip_grad_norm_ on the global norm, one optimizer step per `grad_accum` micro-batches, the loss the
mean over the targets of the whole step. Here `fit` (and so `make_optimizer`) runs a few steps on
RestoreLCC's β and b, and a plain loop replays them with those torch pieces, fed the gradient of the
same loss at its own parameters (computed with jax by the test's own loss, not the trainer's). Loss,
learning rate and gradient norm per step agree to 1e-6 (norm 1e-5) relative; the parameters to 1e-6
relative plus 1e-5 of the summed step sizes, because optax's Adam bias correction is computed in fp32
(1 − fp32(0.999)¹ = 9.9998713e-4), which makes its first update 6.4e-6 (relative) smaller than torch's.
A longer synthetic run (40 steps, three settings) checks `make_optimizer` alone the same way.

Two settings: the paper's (lr 1e-3, no weight decay, clip 1.0, no warm-up), and one that exercises every
part (lr 0.05, decoupled weight decay 0.1, one warm-up step, a clip threshold that binds on some steps
and not on others). Batches are not packed (`pack=False`): packing is pinned by
test_packing_equivalence.py; this file isolates the optimizer.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcc_jax.data.batching import make_batches
from lcc_jax.restore.compensation import init_compensation, split_trainable
from lcc_jax.restore.pipeline import _apply_compensation
from lcc_jax.train import TrainConfig, fit
from model_utils import SMALL_CONFIG, random_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity  # needs PyTorch

CONFIG = SMALL_CONFIG
BATCH, ACCUM, EPOCHS, SAMPLES = 2, 2, 2, 8  # 2 steps per epoch, 4 in all
WIDTH = 16


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=5)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    seqs, masks = [], []
    for _ in range(SAMPLES):
        length = int(rng.integers(6, WIDTH + 1))
        prompt = int(rng.integers(1, length - 1))
        seqs.append(rng.integers(1, CONFIG.vocab_size, length).tolist())
        masks.append([0.0] * prompt + [1.0] * (length - prompt))
    return seqs, masks


@pytest.fixture(scope="module")
def compensation():
    rng = np.random.RandomState(1)
    d = CONFIG.head_dim
    basis = np.stack([np.linalg.qr(rng.randn(d, d))[0].T for _ in range(CONFIG.total_heads)]).astype(np.float32)
    return split_trainable(init_compensation(basis, np.array([3, 6, 0, 5, 1, 2, 4, 7]), 3, jax.random.key(2), std=0.1))


@functools.partial(jax.jit, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})
def _step_loss_and_grad(graphdef, state, trainable, frozen, tokens, attention, loss_mask):
    """Mean next-token NLL over all targets of one step's micro-batches (accum, rows, seq), and its gradient."""

    def mean_nll(t):
        model = nnx.merge(graphdef, state)
        total, count = 0.0, 0.0
        for i in range(tokens.shape[0]):
            logits = _apply_compensation(model, t, tokens[i], attention[i], constants=frozen)
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            picked = jnp.take_along_axis(logp, tokens[i][:, 1:, None], axis=-1)[..., 0]
            weight = loss_mask[i][:, 1:] * attention[i][:, 1:]
            total, count = total - jnp.sum(picked * weight), count + jnp.sum(weight)
        return total / count

    return jax.value_and_grad(mean_nll)(trainable)


def batches(data):
    seqs, masks = data
    return make_batches(seqs, BATCH, pad_id=0, loss_masks=masks, buckets=(WIDTH,), order="given")


def reference_loop(model, trainable, frozen, data, config: TrainConfig):
    """HF Trainer's optimizer stack by hand: (losses, lrs, grad norms, final {"beta", "bias"})."""
    graphdef, state = nnx.split(model)
    micro = batches(data)
    steps_per_epoch = len(micro) // config.grad_accum
    total_steps = config.epochs * steps_per_epoch
    params = {k: torch.tensor(np.asarray(v), dtype=torch.float32, requires_grad=True) for k, v in trainable.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=config.learning_rate, betas=(config.adam_b1, config.adam_b2),
                                  eps=config.adam_eps, weight_decay=config.weight_decay)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, config.warmup_steps, total_steps)
    losses, lrs, norms = [], [], []
    for _ in range(config.epochs):
        for s in range(steps_per_epoch):
            group = micro[s * config.grad_accum : (s + 1) * config.grad_accum]
            stack = [np.stack([getattr(b, f) for b in group]) for f in ("tokens", "attention_mask", "loss_mask")]
            current = {k: jnp.asarray(p.detach().numpy()) for k, p in params.items()}
            loss, grads = _step_loss_and_grad(graphdef, state, current, frozen, *(jnp.asarray(x) for x in stack))
            for k, p in params.items():
                p.grad = torch.tensor(np.asarray(grads[k]))
            norm = torch.nn.utils.clip_grad_norm_(params.values(), config.max_grad_norm or float("inf"))
            lrs.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(float(loss))
            norms.append(float(norm))
    return losses, lrs, norms, {k: p.detach().numpy() for k, p in params.items()}


PAPER = TrainConfig(learning_rate=1e-3, epochs=EPOCHS, batch_size=BATCH, grad_accum=ACCUM, compute_dtype="float32")
STRESS = TrainConfig(learning_rate=5e-2, epochs=EPOCHS, batch_size=BATCH, grad_accum=ACCUM, compute_dtype="float32",
                     weight_decay=0.1, warmup_steps=1, max_grad_norm=None)  # clip threshold set from the data below


@pytest.mark.parametrize("setting", ["paper", "stress"])
def test_fit_steps_equal_torch_adamw_linear_schedule_and_clipping(model, data, compensation, setting):
    trainable, frozen = compensation
    config = PAPER
    if setting == "stress":
        _, _, free_norms, _ = reference_loop(model, trainable, frozen, data, STRESS)  # unclipped norms
        threshold = float(np.median(free_norms))  # binds on about half the steps
        config = dataclasses.replace(STRESS, max_grad_norm=threshold)
    losses, lrs, norms, final = reference_loop(model, trainable, frozen, data, config)
    if setting == "stress":
        clipped = [n > config.max_grad_norm for n in norms]
        assert any(clipped) and not all(clipped), norms
        assert lrs[0] == 0.0  # the warm-up step: HF's schedule starts from 0

    result = fit(model, trainable, _apply_compensation, lambda epoch: batches(data), config, constants=frozen,
                 pack=False)
    assert result.steps == len(losses) == EPOCHS * SAMPLES // (BATCH * ACCUM)
    np.testing.assert_allclose(result.history["lr"], lrs, rtol=1e-6)
    np.testing.assert_allclose(result.history["loss"], losses, rtol=1e-6)
    np.testing.assert_allclose(result.history["grad_norm"], norms, rtol=1e-5)
    for name in ("beta", "bias"):
        got, want = np.asarray(result.trainable[name]), final[name]
        moved = np.abs(want - np.asarray(trainable[name])).max()
        assert moved > 0.5 * config.learning_rate  # the parameters really moved
        # each step may differ by UPDATE_RTOL of its size (see test_one_adamw_step_equals_torch)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=UPDATE_RTOL * sum(lrs), err_msg=name)


# optax computes Adam's bias correction 1 - b2^t in fp32: at t = 1, 1 - fp32(0.999) = 9.9998713e-4, not 1e-3,
# so its first update is 6.4e-6 (relative) smaller than torch's fp64-corrected one; the gap shrinks as t grows.
UPDATE_RTOL = 1e-5


def _quadratic_grads(p: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """A fixed nonlinear gradient field (of Σ scale·(−cos(3v)/3 + v²/4 − c·v)), read at each side's own parameters,
    so a trajectory that drifts does not snap back."""
    return {k: scale * (np.sin(3.0 * v) + 0.5 * v - 0.1 * (i + 1)) for i, (k, v) in enumerate(sorted(p.items()))}


@pytest.mark.parametrize("warmup, decay, clip", [(0, 0.0, 1.0), (3, 0.01, 0.5), (2, 0.1, None)])
def test_many_optimizer_steps_equal_torch(warmup, decay, clip):
    """make_optimizer against torch.optim.AdamW + get_linear_schedule_with_warmup + clip_grad_norm_ over 40 steps
    of a synthetic gradient field (large early gradients, so the clip binds early and not later)."""
    import optax

    from lcc_jax.train import make_optimizer

    steps, lr = 40, 2e-2
    config = TrainConfig(learning_rate=lr, warmup_steps=warmup, weight_decay=decay, max_grad_norm=clip)
    rng = np.random.RandomState(warmup)
    start = {"beta": rng.randn(3, 8).astype(np.float32), "bias": rng.randn(3, 8).astype(np.float32) * 0.1}
    optimizer = make_optimizer(config, steps)
    update = jax.jit(optimizer.update)
    ours = jax.tree.map(jnp.asarray, start)
    state = optimizer.init(ours)
    params = {k: torch.tensor(v, requires_grad=True) for k, v in start.items()}
    reference = torch.optim.AdamW(params.values(), lr=lr, weight_decay=decay, eps=1e-8, betas=(0.9, 0.999))
    schedule = transformers.get_linear_schedule_with_warmup(reference, warmup, steps)
    clipped = []
    for t in range(steps):
        scale = 4.0 if t < 10 else 0.05
        grads = _quadratic_grads(jax.tree.map(np.asarray, ours), scale)
        updates, state = update(jax.tree.map(jnp.asarray, grads), state, ours)
        ours = optax.apply_updates(ours, updates)
        for k, g in _quadratic_grads({k: v.detach().numpy() for k, v in params.items()}, scale).items():
            params[k].grad = torch.tensor(g.astype(np.float32))
        if clip:
            clipped.append(float(torch.nn.utils.clip_grad_norm_(params.values(), clip)) > clip)
        reference.step()
        schedule.step()
        reference.zero_grad()
    if clip:
        assert any(clipped) and not all(clipped)
    total_lr = sum(lr * min(t / max(warmup, 1), (steps - t) / max(steps - warmup, 1)) for t in range(steps))
    for k, v in params.items():
        moved = np.abs(v.detach().numpy() - start[k]).max()
        assert moved > 10 * lr
        np.testing.assert_allclose(np.asarray(ours[k]), v.detach().numpy(), rtol=1e-6, atol=UPDATE_RTOL * total_lr,
                                   err_msg=k)
