"""Tensor-by-tensor placement of HF tensors into an (abstract, sharded) NNX model, and the reverse.

Import builds the model abstractly (`nnx.eval_shape`), then fills each parameter straight into its
target sharding with `jax.make_array_from_callback`: every device shard reads only its own slice
from the source, so the model is never held twice in host memory (and each process of a multi-host
job reads only what it owns). Every problem is collected and raised once, as a list.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lcc_jax.config import ModelConfig
from lcc_jax.convert.table import Row, hf_names, hf_shape, row_for_hf_name, rows_for, to_hf, to_nnx
from lcc_jax.distributed import gather_to_host
from lcc_jax.errors import UserError
from lcc_jax.models import CausalLM
from lcc_jax.sharding import DEFAULT_RULES, flat_params, param_shardings


class CheckpointError(UserError):
    """A checkpoint that does not fit the model: every problem, listed."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        lines = "\n  - ".join(problems)
        super().__init__(f"{source}: {len(problems)} problem(s) with the checkpoint:\n  - {lines}")


class TensorSource(Protocol):
    """Read-only, lazy access to named HF tensors (safetensors folder, GGUF file, in-memory dict)."""

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...


class DictSource:
    """A TensorSource over an in-memory {name: array} dict (e.g. a PyTorch state_dict as numpy)."""

    def __init__(self, tensors: dict[str, np.ndarray], label: str = "state dict"):
        self.tensors, self.label = tensors, label

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self.tensors[name])

    def __str__(self) -> str:
        return self.label


def check_source(config: ModelConfig, abstract: CausalLM, source: TensorSource) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    params = flat_params(abstract)
    available = set(source.names())
    problems = []
    for name, row, _ in hf_names(config):
        if name not in available:
            problems.append(f"missing tensor {name!r}")
            continue
        want = hf_shape(tuple(params[row.nnx].shape), row)
        got = source.shape(name)
        if tuple(got) != want:
            problems.append(f"tensor {name!r} has shape {tuple(got)}, expected {want}")
    for name in sorted(available):
        if row_for_hf_name(config, name) is None and not _ignorable(config, name):
            problems.append(f"unexpected tensor {name!r} (not part of a {config.model_type} model with this config)")
    if problems:
        raise CheckpointError(str(source), problems)


def _ignorable(config: ModelConfig, name: str) -> bool:
    # Buffers some exporters write, and a tied lm_head duplicated next to the embedding.
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")


def abstract_model(config: ModelConfig, dtype=jnp.float32, attention_impl=None) -> CausalLM:
    return nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, rngs=nnx.Rngs(0), attention_impl=attention_impl))


def model_from_source(
    config: ModelConfig,
    source: TensorSource,
    *,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
    attention_impl=None,
) -> CausalLM:
    """Build a CausalLM whose parameters come from `source`, each placed straight into its sharding."""
    abstract = abstract_model(config, dtype, attention_impl)
    check_source(config, abstract, source)
    shardings = placement_shardings(abstract, mesh, rules)
    rows = {row.nnx: row for row in rows_for(config)}
    for path, var in flat_params(abstract).items():
        var.set_value(_load_param(source, rows[path], config, tuple(var.shape), dtype, shardings[path]))
    return abstract


def placement_shardings(abstract: CausalLM, mesh: Mesh | None, rules=DEFAULT_RULES) -> dict:
    """{param path: sharding}: the mesh's by the logical-axis table, or the first local device without a mesh."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return {path: device for path in flat_params(abstract)}
    return param_shardings(abstract, mesh, rules)


def _load_param(source: TensorSource, row: Row, config, shape, dtype, sharding) -> jax.Array:
    np_dtype = jnp.dtype(dtype)
    cache: dict[int | None, np.ndarray] = {}  # one HF tensor at a time, shared by this param's shards

    def read(layer: int | None) -> np.ndarray:
        if layer not in cache:
            cache.clear()
            cache[layer] = to_nnx(source.get(row.hf_name(layer)), row)
        return cache[layer]

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        if not row.stacked:
            return np.asarray(read(None)[index], dtype=np_dtype)
        layers = range(config.num_layers)[index[0]]
        return np.stack([np.asarray(read(i)[index[1:]], dtype=np_dtype) for i in layers])

    return jax.make_array_from_callback(shape, sharding, shard)


def hf_tensors(model: CausalLM) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, numpy array in the model's dtype) one tensor at a time, in table order."""
    params = flat_params(model)
    for name, row, layer in hf_names(model.config):
        value = params[row.nnx][...]
        if layer is not None:
            value = value[layer]
        yield name, to_hf(gather_to_host(value), row)  # a collective when shards live on several processes
