"""The sequential, layer-by-layer calibration driver shared by Wanda, SparseGPT, OWL and structured pruning.

As in the reference code, the statistics of layer i come from the outputs of the already pruned
layers before it: the calibration hidden states are pushed through layer i once to gather its linear
inputs' statistics, the layer is pruned, and the states are pushed through the *pruned* layer again
to become layer i+1's inputs. Only one layer's activations (in batches) exist at a time, the hidden
states are sharded over the mesh's batch axes, and each step is jitted once (layers share shapes).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lcc_jax.distributed import to_global
from lcc_jax.models.llama import CausalLM
from lcc_jax.progress import bar
from lcc_jax.sharding import batch_sharding

log = logging.getLogger(__name__)

# The linears that read each captured input (see DecoderLayer.linear_inputs).
INPUT_GROUPS: dict[str, tuple[str, ...]] = {
    "attn.q_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "attn.o_proj": ("attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}

Stats = dict[str, Any]  # {input group: a statistics pytree}
LayerParams = dict[str, jax.Array]  # {"attn.q_proj.kernel": (in, out), ...} for one layer


@dataclasses.dataclass
class CalibrationStates:
    """The calibration hidden states entering the current layer, in batches placed on the mesh."""

    batches: list[jax.Array]  # each (batch, seq, embed)
    cos: jax.Array  # (batch, seq, head_dim)
    sin: jax.Array
    mask: jax.Array  # (batch, 1, seq, seq)

    @classmethod
    def embed(cls, model: CausalLM, tokens: np.ndarray, batch_size: int, mesh: Mesh | None = None) -> CalibrationStates:
        """Embed (nsamples, seqlen) calibration tokens; nsamples must divide into batches of batch_size."""
        if tokens.ndim != 2 or len(tokens) % batch_size:
            raise ValueError(
                f"calibration tokens {tokens.shape} must be (nsamples, seqlen) with nsamples a multiple of "
                f"the batch size {batch_size}."
            )
        place = (lambda a: to_global(a, batch_sharding(mesh, a.ndim))) if mesh is not None else jnp.asarray
        graphdef, state = nnx.split(model)
        prepare = _prepare_step(graphdef)
        batches: list[jax.Array] = []
        cos = sin = mask = None
        for start in range(0, len(tokens), batch_size):
            x, cos, sin, mask = prepare(state, place(tokens[start : start + batch_size]))
            batches.append(x)
        return cls(batches, cos, sin, mask)


def layer_params(layer_state: nnx.State) -> LayerParams:
    return {".".join(str(k) for k in path): v[...] for path, v in nnx.to_flat_state(layer_state)}


def iterate_layers(
    model: CausalLM,
    states: CalibrationStates,
    *,
    init_stats: Callable[[LayerParams], Stats] | None,
    update_stats: Callable[[Stats, dict[str, jax.Array]], Stats] | None,
    prune_layer: Callable[[int, LayerParams, Stats | None], tuple[LayerParams, Any]],
    layer_template: tuple[nnx.GraphDef, nnx.State] | None = None,
    desc: str = "pruning",
) -> Iterator[tuple[int, LayerParams, Any]]:
    """Walk the layers in order; yield (layer, pruned params, whatever else prune_layer returned).

    `update_stats(stats, inputs)` runs inside one jitted step per batch with `inputs` from
    DecoderLayer.linear_inputs. `layer_template` is the (graphdef, state) of a pruned layer whose
    structure changed (structured pruning); by default the dense layer's structure is reused.
    """
    graphdef = nnx.graphdef(model.layers)
    collect = _collect_step(graphdef, update_stats) if update_stats is not None else None
    with bar(total=model.config.num_layers, desc=desc, unit="layer") as progress:
        for index in range(model.config.num_layers):
            # Read the stack afresh: the caller may have written earlier layers back in place.
            layer_state = jax.tree.map(lambda a, i=index: a[i], nnx.state(model.layers))
            params = layer_params(layer_state)
            stats = None
            if collect is not None:
                stats = init_stats(params)
                for x in states.batches:
                    stats = collect(layer_state, x, states.cos, states.sin, states.mask, stats)
            new_params, extra = prune_layer(index, params, stats)
            new_graphdef, template = layer_template or (graphdef, layer_state)
            new_state = fill_state(template, new_params)
            forward = _forward_step(new_graphdef)
            states.batches = [forward(new_state, x, states.cos, states.sin, states.mask) for x in states.batches]
            progress.update(1)
            yield index, new_params, extra


def fill_state(template: nnx.State, params: LayerParams) -> nnx.State:
    """`template` (a layer's State, maybe abstract) with every value taken from `params` by path."""
    leaves = [
        (path, var.replace(params[".".join(str(k) for k in path)])) for path, var in nnx.to_flat_state(template)
    ]
    return nnx.from_flat_state(leaves)


def write_layer(model: CausalLM, index: int, params: LayerParams) -> None:
    """Write one layer's (same-shaped) params into the stacked model in place, keeping its sharding.

    An uncommitted stack stays uncommitted: functions compiled for the model before pruning then
    match it after pruning too, instead of compiling again for committed arguments.
    """
    flat = {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(nnx.state(model.layers))}
    for name, value in params.items():
        var = flat[name]
        stacked = var.get_value()
        update = _set_layer(stacked.sharding if stacked.committed else None)
        var.set_value(update(stacked, value.astype(stacked.dtype), index))


@functools.lru_cache(maxsize=64)
def _set_layer(sharding):
    """A donated in-place layer update whose output keeps the stack's sharding (not the new value's)."""
    update = lambda stacked, value, index: jax.lax.dynamic_update_index_in_dim(stacked, value, index, axis=0)  # noqa: E731
    if sharding is None:
        return jax.jit(update, donate_argnums=0)
    return jax.jit(update, donate_argnums=0, out_shardings=sharding)


_COLLECT_CACHE: dict[Any, Callable] = {}


def _collect_step(graphdef: nnx.GraphDef, update_stats):
    """The jitted statistics step; shared by later calls when `update_stats` captures nothing (same code, same work)."""
    key = (graphdef, update_stats.__code__) if getattr(update_stats, "__closure__", 1) is None else None
    if key is not None and key in _COLLECT_CACHE:
        return _COLLECT_CACHE[key]

    @jax.jit
    def collect_step(layer_state, x, cos, sin, mask, stats):
        layer = nnx.merge(graphdef, layer_state)
        _, inputs = layer.linear_inputs(x, cos, sin, mask)
        return update_stats(stats, inputs)

    if key is not None:
        _COLLECT_CACHE[key] = collect_step
    return collect_step


@functools.lru_cache(maxsize=16)
def _prepare_step(graphdef: nnx.GraphDef):
    """Jitted `model.prepare(tokens)`: embeddings, RoPE tables and the attention mask of a calibration batch."""

    @jax.jit
    def prepare_step(state, tokens):
        return nnx.merge(graphdef, state).prepare(tokens)

    return prepare_step


_FORWARD_CACHE: dict[Any, Callable] = {}


def _forward_step(graphdef: nnx.GraphDef):
    if graphdef not in _FORWARD_CACHE:

        @jax.jit
        def forward_step(layer_state, x, cos, sin, mask):
            out, _ = nnx.merge(graphdef, layer_state)(x, cos, sin, mask)
            return out

        _FORWARD_CACHE[graphdef] = forward_step
    return _FORWARD_CACHE[graphdef]
