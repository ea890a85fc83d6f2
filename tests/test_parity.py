"""Logits of lcc_jax against PyTorch `transformers`, for every family in tests/tiny.py.

fp32 must agree to 1e-4 (HF eager attention, random weights far from init) on 40-token rows,
unpadded and right-padded (compared at real positions only), long enough for Mistral's 6-token
sliding window and llama3's scaled frequencies to matter. bf16 is a smoke check against fp32.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from lcc_jax.config import RopeConfig
from lcc_jax.convert.assign import DictSource, model_from_source
from model_utils import forward
from tiny import FAMILIES, hf_model, lcc_model, random_batch, state_dict_numpy

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.parity

FP32_TOL = 1e-4
BF16_TOL = 0.1  # logits here are O(1); bf16 lands within ~0.02 of fp32
LONG = 40


@functools.cache
def _torch_model(family: str):
    return hf_model(family)


@functools.cache
def _lcc_model(family: str):
    return lcc_model(_torch_model(family))


def torch_logits(family: str, tokens: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    model = _torch_model(family)
    with torch.no_grad():
        out = model(
            torch.from_numpy(tokens).long(),
            attention_mask=None if mask is None else torch.from_numpy(mask).long(),
        )
    return out.logits.float().numpy()


def lcc_logits(model, tokens: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    out = forward(model, tokens, mask)
    return np.asarray(out.logits, np.float32)


def max_diff_at_real_positions(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    real = mask.astype(bool)
    return float(np.abs(a[real] - b[real]).max())


def batch_40() -> tuple[np.ndarray, np.ndarray]:
    """Three rows of 40 tokens: unpadded, 7 padding positions, 28 padding positions."""
    tokens, mask = random_batch(batch=3, seq=LONG, pad_last=0, seed=1)
    mask[1, LONG - 7 :] = 0
    mask[2, LONG - 28 :] = 0
    return tokens, mask


@functools.cache
def fp32_logits(family: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lcc_jax logits, transformers logits, mask) on `batch_40`: one forward each per family."""
    tokens, mask = batch_40()
    return lcc_logits(_lcc_model(family), tokens, mask), torch_logits(family, tokens, mask), mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_logits_match_transformers_on_an_unpadded_40_token_row(family):
    got, ref, mask = fp32_logits(family)
    assert got.shape == ref.shape == (3, LONG, 128)
    assert mask[0].all()
    assert float(np.abs(got[0] - ref[0]).max()) <= FP32_TOL


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_logits_match_transformers_at_real_positions_of_right_padded_rows(family):
    got, ref, mask = fp32_logits(family)
    assert mask[1:].sum(axis=1).tolist() == [LONG - 7, 12]
    assert max_diff_at_real_positions(got[1:], ref[1:], mask[1:]) <= FP32_TOL


def test_fp32_logits_match_transformers_without_an_attention_mask():
    tokens, _ = random_batch(batch=1, seq=16, pad_last=0, seed=2)
    ref = torch_logits("qwen3", tokens, None)
    got = lcc_logits(_lcc_model("qwen3"), tokens, None)
    assert float(np.abs(got - ref).max()) <= FP32_TOL


# bf16 is a smoke check: one family per distinct path (untied lm_head, window, tied logits + biases, q/k norms).
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2_tied", "qwen3"])
def test_bf16_forward_is_finite_and_close_to_fp32_transformers(family):
    tokens, mask = batch_40()
    _, ref, _ = fp32_logits(family)
    model = lcc_model(_torch_model(family), dtype=jnp.bfloat16)
    out = forward(model, tokens, mask)
    assert out.logits.dtype == jnp.bfloat16
    got = np.asarray(out.logits, np.float32)
    assert np.isfinite(got).all()
    assert max_diff_at_real_positions(got, ref, mask) <= BF16_TOL


# ----------------------------------------------------------------------------- the long test is not vacuous


def _model_with(family: str, **config_changes):
    """The lcc_jax twin of a family's torch model, with some config fields replaced."""
    base = _lcc_model(family).config
    source = DictSource(state_dict_numpy(_torch_model(family)))
    return model_from_source(base.replace(**config_changes), source, dtype=jnp.float32)


def test_mistral_window_is_what_makes_long_sequences_agree():
    window = _lcc_model("mistral").config.sliding_window
    assert window is not None and window < LONG
    tokens, mask = batch_40()
    _, ref, _ = fp32_logits("mistral")
    unwindowed = lcc_logits(_model_with("mistral", sliding_window=None), tokens, mask)
    diff = np.abs(unwindowed - ref)[0].max(axis=-1)  # per position of the unpadded row
    # Inside the window full causal attention is the same thing; beyond it, it is not.
    assert diff[:window].max() <= FP32_TOL
    assert diff[window:].max() > 1e-2


@pytest.mark.parametrize("family", ["llama3_rope", "llama_linear_rope"])
def test_rope_scaling_is_what_makes_the_scaled_families_agree(family):
    config = _lcc_model(family).config
    assert config.rope.type != "default"
    tokens, mask = batch_40()
    _, ref, _ = fp32_logits(family)
    unscaled = lcc_logits(_model_with(family, rope=RopeConfig(theta=config.rope.theta)), tokens, mask)
    assert max_diff_at_real_positions(unscaled, ref, mask) > 1e-2
