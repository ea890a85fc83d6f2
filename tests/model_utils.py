"""Test helpers: torch-free random lcc_jax models (built through the conversion table, no eager NNX init)
and a cached jitted forward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcc_jax.config import ModelConfig
from lcc_jax.convert.assign import DictSource, abstract_model, model_from_source
from lcc_jax.convert.table import hf_names, hf_shape
from lcc_jax.models import CausalLM, CausalLMOutput
from lcc_jax.sharding import flat_params

# A small GQA Llama most model tests share.
SMALL_CONFIG = ModelConfig(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)


def random_tensors(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """{HF name: array} for every tensor of `config`; norm scales near 1, everything else N(0, 0.1)."""
    rng = np.random.RandomState(seed)
    shapes = {path: tuple(var.shape) for path, var in flat_params(abstract_model(config)).items()}
    tensors = {}
    for name, row, _ in hf_names(config):
        shape = hf_shape(shapes[row.nnx], row)
        base = 1.0 if name.endswith("norm.weight") else 0.0
        tensors[name] = (base + rng.normal(0.0, 0.1, shape)).astype(np.float32)
    return tensors


def random_model(config: ModelConfig, seed: int = 0, dtype=jnp.float32, mesh=None):
    return model_from_source(config, DictSource(random_tensors(config, seed)), dtype=dtype, mesh=mesh)


def _static(value) -> bool:
    return value is None or isinstance(value, (str, bool, int))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jitted_forward(graphdef, static: tuple, state, tokens, attention_mask, dynamic: dict) -> CausalLMOutput:
    return nnx.merge(graphdef, state)(tokens, attention_mask, **dict(static), **dynamic)


def forward(model: CausalLM, tokens, attention_mask=None, **kwargs) -> CausalLMOutput:
    """`model(tokens, attention_mask, **kwargs)` under one jit, cached per (graph, shapes, static kwargs).

    On CPU one whole-program compile costs less than running the model op by op, and repeated
    calls with the same shapes cost nothing.
    """
    graphdef, state = nnx.split(model)
    static = tuple(sorted((k, v) for k, v in kwargs.items() if _static(v)))
    dynamic = {k: v for k, v in kwargs.items() if not _static(v)}
    return _jitted_forward(graphdef, static, state, jnp.asarray(tokens), _maybe_array(attention_mask), dynamic)


def _maybe_array(x):
    return None if x is None else jnp.asarray(x)


def completion_rows(count: int, *, prompt_len: tuple[int, int], response_len: tuple[int, int],
                    response_tokens: list[int], seed: int = 0) -> tuple[list[list[int]], list[list[float]]]:
    """(token rows, loss masks): random prompts from tokens 4-63, then responses drawn from `response_tokens`
    (a per-head shift can learn them), the loss on the response only; lengths drawn from [low, high)."""
    rng = np.random.default_rng(seed)
    seqs, masks = [], []
    for _ in range(count):
        prompt = rng.integers(4, 64, rng.integers(*prompt_len)).tolist()
        response = rng.choice(response_tokens, rng.integers(*response_len)).tolist()
        seqs.append(prompt + response)
        masks.append([0.0] * len(prompt) + [1.0] * len(response))
    return seqs, masks
