"""Device mesh, logical-axis rules, and sharding any pytree like the weights it belongs to.

Parameters are named by the logical axes of their shapes (one table, below); a small rule set maps
logical axes to mesh axes. Masks and compensation never get a hand-written spec: `shard_like` gives
them the sharding of the parameter they mirror.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcc_jax.distributed import to_global
from lcc_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")


class ShardingError(UserError):
    """A mesh that cannot hold the model as asked."""


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Sizes of the (data, fsdp, tensor) mesh axes; -1 takes the devices that are left (default: all on fsdp)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    @classmethod
    def parse(cls, text: str) -> MeshSpec:
        """'data=2,fsdp=4' or 'fsdp=-1,tensor=2'."""
        sizes = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = part.partition("=")
            if name not in MESH_AXES or not value.lstrip("-").isdigit():
                raise ShardingError(f"bad mesh spec {part!r}: expected e.g. 'data=1,fsdp=-1,tensor=1'.")
            sizes[name] = int(value)
        return cls(**sizes)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        free = [i for i, s in enumerate(sizes) if s == -1]
        if len(free) > 1:
            raise ShardingError(f"{self}: at most one mesh axis may be -1.")
        fixed = math.prod(s for s in sizes if s != -1)
        if any(s == 0 or s < -1 for s in sizes) or num_devices % fixed:
            raise ShardingError(f"{self} does not divide {num_devices} devices.")
        if free:
            sizes[free[0]] = num_devices // fixed
        if math.prod(sizes) != num_devices:
            raise ShardingError(
                f"{self} uses {math.prod(sizes)} devices but {num_devices} are present; "
                "make the product equal the device count or set one axis to -1."
            )
        return tuple(sizes)


def make_mesh(spec: MeshSpec | str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    spec = MeshSpec.parse(spec) if isinstance(spec, str) else (spec or MeshSpec())
    devices = list(devices) if devices is not None else jax.devices()
    shape = spec.resolve(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


# Logical axes of every parameter, by its NNX path. Stacked decoder parameters lead with "layers".
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed\.embedding", ("vocab", "embed")),
    (r"layers\.attn\.[qkv]_proj\.kernel", ("layers", "embed", "heads")),
    (r"layers\.attn\.[qkv]_proj\.bias", ("layers", "heads")),
    (r"layers\.attn\.o_proj\.kernel", ("layers", "heads", "embed")),
    (r"layers\.mlp\.(gate|up)_proj\.kernel", ("layers", "embed", "mlp")),
    (r"layers\.mlp\.(gate|up)_proj\.bias", ("layers", "mlp")),
    (r"layers\.mlp\.down_proj\.kernel", ("layers", "mlp", "embed")),
    (r"layers\..*(bias|scale)", ("layers", None)),  # o/down biases, norms: small, replicated
    (r"final_norm\.scale", (None,)),
    (r"lm_head\.kernel", ("embed", "vocab")),
)

# Logical axis -> mesh axis (or axes). Activations: batch over data and fsdp.
DEFAULT_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "layers": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
}


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """The logical axes of the parameter at `path` ('layers.attn.q_proj.kernel')."""
    for pattern, axes in PARAM_AXES:
        if re.fullmatch(pattern, path):
            if len(axes) != ndim:
                raise ShardingError(f"{path}: table gives {len(axes)} axes for a {ndim}-d parameter.")
            return axes
    raise ShardingError(f"no logical axes known for parameter {path!r}; add it to sharding.PARAM_AXES.")


def partition_spec(
    path: str, shape: tuple[int, ...], mesh: Mesh, rules: Mapping = DEFAULT_RULES
) -> PartitionSpec:
    """Mesh axes for one parameter; refuses a mesh axis that does not divide the dimension."""
    spec = []
    for dim, axis in zip(shape, logical_axes(path, len(shape))):
        mesh_axes = rules.get(axis) if axis else None
        if mesh_axes is not None:
            names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            size = math.prod(mesh.shape[n] for n in names)
            if dim % size:
                raise ShardingError(
                    f"{path} has shape {shape}: its {axis!r} dimension {dim} does not divide over mesh "
                    f"axis {mesh_axes} of size {size}. Choose a mesh whose {mesh_axes} size divides {dim} "
                    f"(e.g. --mesh fsdp=1,data=-1), or change the rule for {axis!r}."
                )
        spec.append(mesh_axes)
    return PartitionSpec(*spec)


def path_str(path: Sequence) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def flat_params(model_or_state) -> dict[str, nnx.Variable]:
    """{'layers.attn.q_proj.kernel': Param, ...} for a module or a State."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return {path_str(path): var for path, var in nnx.to_flat_state(state)}


def param_shardings(model_or_state, mesh: Mesh, rules: Mapping = DEFAULT_RULES) -> dict[str, NamedSharding]:
    """{path: NamedSharding} for every parameter (works on abstract models from nnx.eval_shape)."""
    return {
        path: NamedSharding(mesh, partition_spec(path, tuple(var.shape), mesh, rules))
        for path, var in flat_params(model_or_state).items()
    }


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping = DEFAULT_RULES) -> nnx.Module:
    """Place every parameter of `model` on `mesh` by the table (in place; returns the model)."""
    shardings = param_shardings(model, mesh, rules)
    for path, var in flat_params(model).items():
        var.set_value(jax.device_put(var[...], shardings[path]))  # replace, not scatter into the old placement
    return model


def shard_like(tree: Mapping[str, jax.Array], params, mesh: Mesh | None = None) -> dict[str, jax.Array]:
    """Place each leaf of `tree` ({param path: array}) with the sharding of the parameter at that path.

    Each leaf must have its parameter's shape (masks do); `params` is a module, a State, or a
    {path: array} dict of placed arrays.
    """
    flat = params if isinstance(params, Mapping) and not isinstance(params, nnx.State) else flat_params(params)
    out = {}
    for path, leaf in tree.items():
        if path not in flat:
            raise ShardingError(f"{path!r} mirrors no parameter; known: {sorted(flat)[:5]}...")
        ref = flat[path]
        ref = ref[...] if isinstance(ref, nnx.Variable) else ref
        if tuple(leaf.shape) != tuple(ref.shape):
            raise ShardingError(f"{path}: shape {tuple(leaf.shape)} does not match the parameter's {tuple(ref.shape)}.")
        sharding = ref.sharding if mesh is None else NamedSharding(mesh, ref.sharding.spec)
        out[path] = to_global(leaf, sharding)  # numpy leaves: no cross-process check
    return out


def map_under_mesh(fn: Callable[[Any], Any], items: Sequence[Any], mesh: Mesh | None, workers: int = 8) -> list:
    """[fn(item) for item in items] in threads (XLA compiles outside the GIL), each thread under `jax.set_mesh(mesh)`.

    The mesh context is per thread. Traced in a bare worker thread, a model's sharding constraints
    (`activation_constraint`) see no mesh and are silently skipped, so the compiled program is not the
    one the calling thread would build: on two H200s under fsdp, cuDNN's partitioner then refused the
    attention operands (capture and training fell back to XLA attention), and activations were left
    unsplit by batch.
    """
    items = list(items)

    def run(item):
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            return fn(item)

    if len(items) <= 1:
        return [run(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
        return list(pool.map(run, items))


def activation_spec(shape: Sequence[int], logical: Sequence[str | None], mesh,
                    rules: Mapping = DEFAULT_RULES) -> PartitionSpec:
    """Mesh axes for an activation whose dimensions have the `logical` names ("batch", "heads", None...).

    Axes the mesh lacks or holds once are left out; a dimension the remaining axes do not divide
    stays whole (activations never refuse a mesh, unlike parameters).
    """
    spec = []
    for dim, axis in zip(shape, logical, strict=True):
        names = rules.get(axis) if axis else None
        names = (names,) if isinstance(names, str) else tuple(names or ())
        names = tuple(n for n in names if n in mesh.axis_names and mesh.shape[n] > 1)
        size = math.prod(mesh.shape[n] for n in names)
        spec.append(None if not names or dim % size else names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def activation_constraint(x: jax.Array, logical: Sequence[str | None], rules: Mapping = DEFAULT_RULES) -> jax.Array:
    """`x` pinned to `activation_spec` while tracing under `jax.set_mesh`; unchanged without a mesh or
    when no dimension would be split (the compiler keeps its own choice then)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = activation_spec(x.shape, logical, mesh, rules)
    if all(s is None for s in spec):
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Mapping = DEFAULT_RULES) -> NamedSharding:
    """Sharding for a (batch, ...) input: batch over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(rules["batch"], *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh, rules: Mapping = DEFAULT_RULES) -> int:
    """How many pieces a batch is cut into on `mesh` (the product of its batch axes' sizes)."""
    axes = rules["batch"]
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
