"""Weight-space surgery for the baselines: run a model with some stacked kernels replaced.

LoRA, DoRA and LoFiT's head scaling all change a linear's weight, and our attention block has no
door inside its linears (only the o_proj-input doors). So an adapter builds the new kernels
functionally, (layers, in, out) each, and `with_kernels` returns a module that shares every other
parameter with the model and holds the new kernels in fresh variables: the model itself is never
mutated, which keeps it safe to call inside `jax.jit`, `jax.grad` and the trainer's scan.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx

from lcc_jax.sharding import path_str

# Short target names (as in PEFT's target_modules, without "_proj") -> stacked kernel paths.
TARGETS: dict[str, str] = {
    "q": "layers.attn.q_proj.kernel",
    "k": "layers.attn.k_proj.kernel",
    "v": "layers.attn.v_proj.kernel",
    "o": "layers.attn.o_proj.kernel",
    "gate": "layers.mlp.gate_proj.kernel",
    "up": "layers.mlp.up_proj.kernel",
    "down": "layers.mlp.down_proj.kernel",
}
O_PROJ = TARGETS["o"]


def target_name(name: str) -> str:
    """'q', 'q_proj' or 'layers.attn.q_proj.kernel' -> 'q'."""
    for short, path in TARGETS.items():
        if name in (short, f"{short}_proj", path):
            return short
    raise ValueError(f"unknown target module {name!r}; choose from {', '.join(TARGETS)} (or their *_proj names).")


def with_kernels(model: nnx.Module, kernels: Mapping[str, jax.Array]) -> nnx.Module:
    """A module computing like `model` but with `kernels` ({param path: array}) in place of those parameters.

    Untouched parameters are shared (same arrays, fresh variable containers); `model` is not modified.
    """
    graphdef, state = nnx.split(model)
    found = set()
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = path_str(path)
        if key in kernels:
            found.add(key)
            if tuple(kernels[key].shape) != tuple(var.shape):
                raise ValueError(f"{key}: new kernel {tuple(kernels[key].shape)} != {tuple(var.shape)}.")
            flat.append((path, var.replace(kernels[key])))
        else:
            flat.append((path, var.replace(var[...])))
    missing = set(kernels) - found
    if missing:
        raise ValueError(f"the model has no parameters {sorted(missing)}.")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
