"""The two doors at the o_proj input: capture (read per-head outputs) and compensation (add per-head vectors).

Against PyTorch: a forward pre-hook on every `self_attn.o_proj` reads (and, for compensation, changes)
exactly the tensor lcc_jax exposes, so head (l, h) must mean the same slice on both sides.
Torch-free tests first (cheap), parity tests after.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcc_jax.models import CausalLM, last_token_positions
from model_utils import SMALL_CONFIG, forward, random_model
from tiny import hf_model, lcc_model, random_batch

TOL = 1e-4

SMALL = SMALL_CONFIG


@functools.cache
def small_model() -> CausalLM:
    return random_model(SMALL)


def small_batch() -> tuple[jax.Array, jax.Array]:
    tokens, mask = random_batch(batch=2, seq=10, vocab=SMALL.vocab_size, pad_last=3)
    return jnp.asarray(tokens), jnp.asarray(mask)


# ----------------------------------------------------------------------------- torch-free


def test_last_token_positions_finds_the_last_real_token_of_right_padded_rows():
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    assert last_token_positions(mask).tolist() == [[3], [1], [0]]


def test_compensation_of_the_wrong_shape_is_refused_with_the_expected_shape():
    tokens, mask = small_batch()
    expected = r"compensation has shape \(2, 4, 7\); expected \(layers, heads, head_dim\) = \(2, 4, 8\)"
    with pytest.raises(ValueError, match=expected):
        small_model()(tokens, mask, compensation=jnp.zeros((2, 4, 7)))
    with pytest.raises(ValueError, match=r"compensation has shape \(4, 8\)"):
        small_model()(tokens, mask, compensation=jnp.zeros((4, 8)))  # one layer's worth, not all


def test_unknown_capture_mode_is_refused():
    tokens, mask = small_batch()
    with pytest.raises(ValueError, match="capture must be None, 'all' or an int array"):
        small_model()(tokens, mask, capture="last")


def _primitive_counts(jaxpr) -> collections.Counter:
    counts = collections.Counter(eqn.primitive.name for eqn in jaxpr.eqns)
    for sub in jex.subjaxprs(jaxpr):
        counts += _primitive_counts(sub)
    return counts


def _traced(**doors):
    graphdef, state = nnx.split(small_model())
    tokens, mask = small_batch()
    fn = lambda s, t, m: nnx.merge(graphdef, s)(t, m, **doors)  # noqa: E731
    closed = jax.make_jaxpr(fn)(state, tokens, mask)
    (scan,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "scan"]
    return closed.jaxpr, scan


def test_closed_doors_add_nothing_to_the_traced_program():
    plain_jaxpr, plain_scan = _traced()
    comp_jaxpr, comp_scan = _traced(compensation=jnp.zeros((2, 4, 8)))
    capture_jaxpr, capture_scan = _traced(capture="all")
    # With both doors shut, the layer scan carries the residual stream and emits nothing per layer.
    assert len(plain_scan.outvars) == 1
    # Opening compensation adds exactly one broadcast add per layer body, and nothing else.
    extra = _primitive_counts(comp_jaxpr) - _primitive_counts(plain_jaxpr)
    assert extra == collections.Counter({"add": 1, "broadcast_in_dim": 1})
    assert not _primitive_counts(plain_jaxpr) - _primitive_counts(comp_jaxpr)
    # Opening capture adds one stacked output and no computation.
    assert len(capture_scan.outvars) == 2
    assert _primitive_counts(capture_jaxpr) == _primitive_counts(plain_jaxpr)


def test_no_capture_returns_no_heads():
    tokens, mask = small_batch()
    assert forward(small_model(), tokens, mask).heads is None


def test_capture_does_not_change_logits():
    tokens, mask = small_batch()
    plain = forward(small_model(), tokens, mask)
    captured = forward(small_model(), tokens, mask, capture="all")
    assert captured.heads.shape == (2, 2, 10, 4, 8)  # (layers, batch, positions, heads, head_dim)
    np.testing.assert_array_equal(np.asarray(captured.logits), np.asarray(plain.logits))


def test_zero_compensation_equals_no_compensation_exactly():
    tokens, mask = small_batch()
    plain = forward(small_model(), tokens, mask, capture="all")
    zero = forward(small_model(), tokens, mask, capture="all", compensation=jnp.zeros((2, 4, 8)))
    np.testing.assert_array_equal(np.asarray(zero.logits), np.asarray(plain.logits))
    np.testing.assert_array_equal(np.asarray(zero.heads), np.asarray(plain.heads))


def test_capture_at_positions_gathers_rows_of_the_full_capture():
    tokens, mask = small_batch()
    full = forward(small_model(), tokens, mask, capture="all").heads
    positions = jnp.array([[0, 9, 4], [6, 1, 1]])
    some = forward(small_model(), tokens, mask, capture=positions).heads
    assert some.shape == (2, 2, 3, 4, 8)
    for b in range(2):
        np.testing.assert_array_equal(np.asarray(some[:, b]), np.asarray(full[:, b, positions[b]]))


# ----------------------------------------------------------------------------- against PyTorch

HOOK_FAMILIES = ["llama", "llama_mha_bias", "qwen3"]  # GQA; MHA with an o_proj bias; head_dim != hidden/heads


@functools.cache
def _pair(family: str):
    model = hf_model(family)
    return model, lcc_model(model)


def torch_with_o_proj_hooks(family: str, tokens, mask, add: np.ndarray | None = None):
    """Logits and every layer's o_proj input as (layers, batch, seq, heads, head_dim); `add` is added first."""
    torch = pytest.importorskip("torch")
    model, _ = _pair(family)
    config = model.config
    heads, head_dim = config.num_attention_heads, config.head_dim
    recorded: dict[int, np.ndarray] = {}

    def pre_hook(layer: int):
        def hook(module, args):
            x = args[0]
            if add is not None:
                x = x + torch.from_numpy(add[layer]).reshape(heads * head_dim)
            recorded[layer] = x.detach().numpy().copy()
            return (x, *args[1:])

        return hook

    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(pre_hook(i)) for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long()).logits
    finally:
        for handle in handles:
            handle.remove()
    batch, seq = tokens.shape
    stacked = np.stack([recorded[i] for i in range(len(recorded))])
    return logits.numpy(), stacked.reshape(len(recorded), batch, seq, heads, head_dim)


def _real(mask: np.ndarray) -> np.ndarray:
    return mask.astype(bool)


@pytest.mark.parity
@pytest.mark.parametrize("family", HOOK_FAMILIES)
def test_captured_heads_equal_torch_o_proj_inputs(family):
    tokens, mask = random_batch(batch=2, seq=12, pad_last=4, seed=5)
    _, torch_heads = torch_with_o_proj_hooks(family, tokens, mask)
    _, model = _pair(family)
    out = forward(model, tokens, mask, capture="all")
    c = model.config
    assert out.heads.shape == (c.num_layers, 2, 12, c.num_heads, c.head_dim) == torch_heads.shape
    got = np.asarray(out.heads)
    assert np.abs(got[:, _real(mask)] - torch_heads[:, _real(mask)]).max() <= TOL

    # Last-token capture: the rows RestoreLCC collects.
    last = last_token_positions(jnp.asarray(mask))
    assert last.tolist() == [[11], [7]]
    at_last = forward(model, tokens, mask, capture=last).heads
    assert at_last.shape == (c.num_layers, 2, 1, c.num_heads, c.head_dim)
    want = torch_heads[:, [0, 1], [11, 7]]  # (layers, batch, heads, head_dim)
    assert np.abs(np.asarray(at_last[:, :, 0]) - want).max() <= TOL


@pytest.mark.parity
@pytest.mark.parametrize("family", HOOK_FAMILIES)
def test_compensation_equals_a_torch_pre_hook_adding_the_same_vectors(family):
    _, model = _pair(family)
    c = model.config
    tokens, mask = random_batch(batch=2, seq=12, pad_last=4, seed=6)
    delta = np.random.RandomState(7).normal(0, 0.5, (c.num_layers, c.num_heads, c.head_dim)).astype(np.float32)
    torch_logits, torch_heads = torch_with_o_proj_hooks(family, tokens, mask, add=delta)
    out = forward(model, tokens, mask, capture="all", compensation=jnp.asarray(delta))
    real = _real(mask)
    assert np.abs(np.asarray(out.logits)[real] - torch_logits[real]).max() <= TOL
    # What is captured is the o_proj input, compensation included.
    assert np.abs(np.asarray(out.heads)[:, real] - torch_heads[:, real]).max() <= TOL
    # And the compensation did something.
    plain = forward(model, tokens, mask).logits
    assert np.abs(np.asarray(plain)[real] - torch_logits[real]).max() > 1e-2


@pytest.mark.parity
def test_compensating_one_head_moves_only_that_heads_slice_of_the_o_proj_input():
    _, model = _pair("llama")
    c = model.config
    tokens, mask = random_batch(batch=1, seq=8, pad_last=0, seed=8)
    delta = np.zeros((c.num_layers, c.num_heads, c.head_dim), np.float32)
    delta[1, 2] = 1.0  # layer 1, head 2
    _, torch_heads = torch_with_o_proj_hooks("llama", tokens, mask, add=delta)
    _, torch_plain = torch_with_o_proj_hooks("llama", tokens, mask)
    moved = np.abs(torch_heads - torch_plain).max(axis=(1, 2, 4))  # (layers, heads)
    # In torch, head (1, 2) of the pre-hook's flat vector is exactly lcc_jax's [1, 2] slice ...
    np.testing.assert_allclose(moved[1, 2], 1.0, atol=1e-6)
    assert moved[0].max() == 0.0 and np.delete(moved[1], 2).max() == 0.0
    # ... and lcc_jax agrees on where it lands.
    out = forward(model, tokens, mask, capture="all", compensation=jnp.asarray(delta))
    assert np.abs(np.asarray(out.heads) - torch_heads).max() <= TOL
