"""Multi-device scaling: capture and compensation-training throughput on 1, 2, 4, 8 devices.

For a shape (default llama2-7b, random bf16 weights) and each device count N (capped at the devices
present), the model is drawn directly sharded on a (data, fsdp, tensor) mesh over the first N devices,
for each mesh kind:

  fsdp    data=1, fsdp=N, tensor=1      weights and batch split N ways (ZeRO-3 style)
  data    data=N, fsdp=1, tensor=1      weights replicated, batch split N ways (pure data parallel)
  hybrid  data=2, fsdp=N/2, tensor=1    N >= 4
  tensor  data=1, fsdp=N/2, tensor=2    heads, MLP and vocab split over 2 devices, the rest fsdp

and measures, warm (the first call compiles every shape):
  scaling_capture     `capture_last_token` (forward, per-head last-token capture) of N x the
                      per-device samples at N x the per-device batch (weak scaling);
  scaling_train_step  `fit` (forward + backward to the o_proj inputs, AdamW on β and b of the top 25 %
                      of heads) at global batch N x the per-device batch (weak scaling).
With `--modes weak,strong` the global sizes are also held fixed at their N_max values (strong scaling).

Efficiency = tokens/s at N / (N x tokens/s at 1 device), for the same stage and mode. Peak memory is
`peak_bytes_in_use` of each device of the mesh (None on CPU); JAX cannot reset it, so by default every
device count runs in a process of its own (`--in-process` keeps one), its meshes ordered by growing
weight bytes per device, and a record's peak is its process's peak up to the end of that record.

  python -m benchmarks.scaling --shape llama2-7b --devices 1,2,4,8 --out results/scaling.json
  python -m benchmarks.scaling --plan --shape llama2-70b --devices 8     # sharding plan only, no weights
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python -m benchmarks.scaling --shape tiny --in-process               # the CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from benchmarks.common import SHAPES, Shape, append_records, cold_then_warm, data, model_config, model_flops, record
from benchmarks.schema import read_report, write_report
from lcc_jax.models import CausalLM
from lcc_jax.restore.config import RestoreConfig
from lcc_jax.restore.top_k import TopK
from lcc_jax.sharding import MESH_AXES, ShardingError, batch_shards, param_shardings, path_str

log = logging.getLogger("benchmarks")

STAGE_CAPTURE, STAGE_TRAIN = "scaling_capture", "scaling_train_step"
# the shared schema's stage each of ours mirrors (same fields and FLOP formula), for `common.record`
BASE_STAGE = {STAGE_CAPTURE: "capture", STAGE_TRAIN: "train_step"}

# Shapes beyond the shared table (Hugging Face Llama-2 configs).
LARGE_SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("llama2-13b", vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
              num_heads=40, num_kv_heads=40, head_dim=128, max_position_embeddings=4096),
        Shape("llama2-70b", vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80,
              num_heads=64, num_kv_heads=8, head_dim=128, max_position_embeddings=4096),
    )
}
ALL_SHAPES: dict[str, Shape] = {**LARGE_SHAPES, **SHAPES}


def get_any_shape(name: str) -> Shape:
    """A shape of the shared table or of `LARGE_SHAPES`."""
    if name not in ALL_SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(ALL_SHAPES)}")
    return ALL_SHAPES[name]


# ------------------------------------------------------------------------------------------ meshes

MESH_KINDS = ("fsdp", "tensor", "hybrid", "data")  # in order of growing weight bytes per device


def mesh_sizes(kind: str, n: int) -> tuple[int, int, int] | None:
    """(data, fsdp, tensor) of mesh `kind` over n devices, or None where the kind needs more devices."""
    if kind == "fsdp":
        return (1, n, 1)
    if kind == "data":
        return (n, 1, 1)
    if kind == "hybrid":
        return (2, n // 2, 1) if n >= 4 and n % 2 == 0 else None
    if kind == "tensor":
        return (1, n // 2, 2) if n >= 2 and n % 2 == 0 else None
    raise ValueError(f"unknown mesh kind {kind!r}; known: {', '.join(MESH_KINDS)}")


def mesh_text(sizes: Sequence[int]) -> str:
    return ",".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))


def plan_meshes(kinds: Sequence[str], n: int) -> list[tuple[str, tuple[int, int, int]]]:
    """[(kind, sizes)] for n devices: each distinct mesh once, small weights first; n=1 is always the one
    single-device mesh (every kind's baseline)."""
    if n == 1:
        return [("single", (1, 1, 1))]
    out, seen = [], set()
    for kind in sorted(kinds, key=MESH_KINDS.index):
        sizes = mesh_sizes(kind, n)
        if sizes is None or sizes in seen:
            continue
        seen.add(sizes)
        out.append((kind, sizes))
    return out


def device_mesh(sizes: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh of the given sizes over the first prod(sizes) devices."""
    devices = list(devices if devices is not None else jax.devices())
    need = math.prod(sizes)
    if need > len(devices):
        raise ShardingError(f"mesh {mesh_text(sizes)} needs {need} devices; {len(devices)} are present.")
    return Mesh(np.asarray(devices[:need]).reshape(tuple(sizes)), MESH_AXES)


def abstract_mesh(sizes: Sequence[int]) -> AbstractMesh:
    """A mesh of the given sizes with no devices behind it: enough for sharding plans."""
    return AbstractMesh(tuple(sizes), MESH_AXES)


# ------------------------------------------------------------------------------------- the model


def _make(shape: Shape, dtype, seed: int):
    config = model_config(shape)
    return lambda: CausalLM(config, dtype=dtype, rngs=nnx.Rngs(seed))


def abstract_model(shape: Shape, dtype=jnp.bfloat16) -> CausalLM:
    """The model as ShapeDtypeStructs (nnx.eval_shape): no memory, any size."""
    return nnx.eval_shape(_make(shape, dtype, 0))


def state_shardings(state: nnx.State, mesh) -> Any:
    """A pytree like `state` holding each parameter's NamedSharding (the table in lcc_jax.sharding)."""
    by_path = param_shardings(state, mesh)

    def one(path, _):
        keys = [p for p in path if not isinstance(p, jax.tree_util.GetAttrKey)]
        return by_path[path_str(keys)]

    return jax.tree_util.tree_map_with_path(one, state)


def abstract_state(shape: Shape, mesh, dtype=jnp.bfloat16) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state of ShapeDtypeStructs carrying their shardings on `mesh`)."""
    graphdef, state = nnx.split(abstract_model(shape, dtype))
    shardings = state_shardings(state, mesh)
    return graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


INIT_STD = 0.02  # the model's kernel initialiser (lcc_jax.models.llama); speed does not depend on it


def random_sharded_model(shape: Shape, mesh: Mesh, dtype=jnp.bfloat16, seed: int = 0) -> CausalLM:
    """A CausalLM of `shape` with random weights drawn where they live: every device makes only its shards.

    The model is traced abstractly (nnx.eval_shape); then each parameter is drawn by its own jitted
    function with the table's sharding as out_sharding, one layer at a time (threefry is partitionable),
    so no device or host ever holds a whole weight and the random bits of at most one layer's shard
    exist at once. Kernels and embeddings ~ N(0, 0.02²), norm scales 1, biases 0.
    """
    graphdef, abstract = nnx.split(abstract_model(shape, jnp.dtype(dtype)))
    shardings = state_shardings(abstract, mesh)
    leaves, treedef = jax.tree.flatten(abstract)
    started = time.perf_counter()
    root = jax.random.key(seed)
    with jax.set_mesh(mesh):
        arrays = [drawer(leaf.shape, leaf.dtype, sharding, kind)(jax.random.fold_in(root, i))
                  for i, ((leaf, sharding), kind) in enumerate(zip(zip(leaves, jax.tree.leaves(shardings)),
                                                                   _init_kinds(abstract)))]
    jax.block_until_ready(arrays)
    log.info("random %s model (%s) on mesh %s in %.1f s", shape.name, jnp.dtype(dtype).name,
             mesh_text(mesh.devices.shape), time.perf_counter() - started)
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, arrays))


def _init_kinds(state: nnx.State) -> list[str]:
    """"ones", "zeros" or "normal" for each leaf of `state`, in leaf order."""
    def kind(path, _):
        last = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
        return "ones" if last == "scale" else "zeros" if last == "bias" else "normal"

    return jax.tree.leaves(jax.tree_util.tree_map_with_path(kind, state))


@functools.lru_cache(maxsize=64)
def drawer(shape: tuple[int, ...], dtype, sharding, kind: str):
    """jit(key -> one parameter of `shape`), placed by `sharding`; stacked (layers, ...) ones a layer at a time."""
    dtype = jnp.dtype(dtype)

    def one(key, shape):
        if kind == "ones":
            return jnp.ones(shape, dtype)
        if kind == "zeros":
            return jnp.zeros(shape, dtype)
        return (INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    def draw(key):
        if len(shape) < 3:
            return one(key, shape)
        return jax.lax.map(lambda k: one(k, shape[1:]), jax.random.split(key, shape[0]))

    return jax.jit(draw, out_shardings=sharding)


def reshard(model: CausalLM, mesh: Mesh) -> CausalLM:
    """`model` moved onto `mesh` by the sharding table (no compilation; the old placement is released when
    the caller drops `model`)."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh))
    jax.block_until_ready(state)
    return nnx.merge(graphdef, state)


def weight_bytes_per_device(state: nnx.State, mesh) -> int:
    """Bytes of parameters one device holds on `mesh` (the most loaded device; even shards make them equal)."""
    arrays = dict(_flat(state))
    return sum(math.prod(sharding.shard_shape(tuple(arrays[path].shape))) * jnp.dtype(arrays[path].dtype).itemsize
               for path, sharding in param_shardings(state, mesh).items())


def _flat(state: nnx.State):
    """(path, array or ShapeDtypeStruct) of every parameter."""
    for path, var in nnx.to_flat_state(state):
        yield path_str(path), (var.get_value() if isinstance(var, nnx.Variable) else var)


def device_peaks_gib(devices: Sequence[jax.Device]) -> list[float | None]:
    """peak_bytes_in_use of each device in GiB (None where the backend keeps no statistics, e.g. CPU)."""
    out = []
    for device in devices:
        stats = device.memory_stats() or {}
        out.append(stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None)
    return out


# ------------------------------------------------------------------------------------ the workload


PAPER = RestoreConfig()  # the job's defaults: the sizes that are the job's come from here


@dataclasses.dataclass(frozen=True)
class ScalingWork:
    """Per-device sizes (weak scaling: the global sizes grow with the device count)."""

    seed: int = 0
    capture_samples: int = 512  # per device
    capture_batch: int = 64  # per device
    capture_min_len: int = 50
    capture_max_len: int = 150
    train_steps: int = 20
    train_batch: int = PAPER.batch_size  # per device
    train_min_len: int = 120
    train_max_len: int = PAPER.max_length
    top_k: TopK = PAPER.top_k
    remat: bool = PAPER.remat

    def replace(self, **changes) -> ScalingWork:
        return dataclasses.replace(self, **changes)


TINY_WORK = ScalingWork(capture_samples=8, capture_batch=4, capture_min_len=8, capture_max_len=32, train_steps=2,
                        train_batch=2, train_min_len=8, train_max_len=30)  # one capture bucket, one step shape


def default_work(shape: str) -> ScalingWork:
    return TINY_WORK if shape == "tiny" else ScalingWork()


def work_with(work: ScalingWork, settings: Sequence[str]) -> ScalingWork:
    """`work` with FIELD=VALUE overrides."""
    fields = {f.name: f for f in dataclasses.fields(ScalingWork)}
    changes: dict[str, Any] = {}
    for item in settings:
        key, _, text = item.partition("=")
        if key not in fields:
            raise ValueError(f"unknown field {key!r}; known: {', '.join(fields)}")
        current = getattr(work, key)
        changes[key] = (text.lower() in ("1", "true", "yes") if isinstance(current, bool)
                        else TopK.parse(text) if isinstance(current, TopK)
                        else float(text) if isinstance(current, float) else int(text))
    return work.replace(**changes)


def _scale(mode: str, n: int, n_max: int) -> int:
    """How many per-device units the global size holds: n (weak) or n_max (strong)."""
    if mode not in ("weak", "strong"):
        raise ValueError(f"mode must be 'weak' or 'strong', not {mode!r}.")
    return n if mode == "weak" else n_max


def _record(stage: str, shape: Shape, seconds: float, mesh: Mesh, kind: str, mode: str, **fields) -> dict:
    """A record in the shared schema, with the scaling fields and every mesh device's peak memory."""
    rec = record(BASE_STAGE[stage], shape.name, seconds, **fields)
    peaks = device_peaks_gib(list(mesh.devices.flat))
    known = [p for p in peaks if p is not None]
    rec.update(stage=stage, devices=int(mesh.devices.size), mesh=mesh_text(mesh.devices.shape), mesh_kind=kind,
               scaling=mode, efficiency=None, speedup=None, peak_mem_gib=max(known) if known else None,
               peak_mem_gib_per_device=peaks, peak_mem_kind="process peak of each mesh device up to the end of "
                                                             "this record (one process per device count)")
    return rec


def bench_capture(model: CausalLM, shape: Shape, mesh: Mesh, kind: str, mode: str, n_max: int, work: ScalingWork,
                  peak_tflops: float | None) -> dict:
    """Warm `capture_last_token` throughput on `mesh` (the first call compiles every bucket)."""
    from lcc_jax.restore.capture import capture_last_token

    n = int(mesh.devices.size)
    units = _scale(mode, n, n_max)
    samples, batch = work.capture_samples * units, work.capture_batch * units
    lengths = data.capture_lengths(samples, work.seed, work.capture_min_len, work.capture_max_len)
    sequences = data.token_sequences(lengths, shape.vocab_size, work.seed)

    def run():
        return capture_last_token(model, sequences, batch, mesh=mesh, max_length=work.capture_max_len,
                                  desc=f"capture {n}x")

    cold, seconds, heads = cold_then_warm(run)
    flops = model_flops(shape, lengths, backward=False, lm_head=False)
    return _record(STAGE_CAPTURE, shape, seconds, mesh, kind, mode, tokens=int(lengths.sum()), samples=samples,
                   model_flops=flops, peak_tflops=None if peak_tflops is None else peak_tflops * n,
                   variant=f"{mode}-{kind}-{n}", batch_size=batch, cold_seconds=cold,
                   activations_shape=list(heads.shape),
                   notes="warm capture_last_token on the mesh; MFU against n x the one-device bf16 peak")


def bench_train(model: CausalLM, shape: Shape, mesh: Mesh, kind: str, mode: str, n_max: int, work: ScalingWork,
                peak_tflops: float | None) -> dict:
    """Warm `fit` throughput on `mesh`: a second, identical fit with every step shape compiled."""
    from lcc_jax.baselines.bias_only import apply_compensation
    from lcc_jax.data.batching import make_batches
    from lcc_jax.restore.compensation import init_compensation, split_trainable
    from lcc_jax.train import TrainConfig, fit

    n = int(mesh.devices.size)
    batch = work.train_batch * _scale(mode, n, n_max)
    samples = data.training_samples(work.train_steps * batch, shape.vocab_size, work.seed, work.train_min_len,
                                    work.train_max_len)
    sequences = [s.ids.astype(np.int32) for s in samples]
    loss_masks = [np.r_[np.zeros(s.prompt_len), np.ones(len(s) - s.prompt_len)].astype(np.float32) for s in samples]
    batches = make_batches(sequences, batch, pad_id=0, loss_masks=loss_masks, order="given")
    rng = np.random.default_rng(work.seed)
    basis = np.linalg.qr(rng.normal(size=(shape.total_heads, shape.head_dim, shape.head_dim)))[0]
    comp = init_compensation(basis.transpose(0, 2, 1).astype(np.float32), rng.permutation(shape.total_heads),
                             work.top_k, jax.random.key(work.seed))
    trainable, frozen = split_trainable(comp)
    config = TrainConfig(epochs=1, batch_size=batch, log_every=max(1, work.train_steps // 2), seed=work.seed,
                         remat=work.remat)

    def run():
        result = fit(model, trainable, apply_compensation, lambda epoch: batches, config, constants=frozen, mesh=mesh)
        jax.block_until_ready(result.trainable)
        return result

    cold, seconds, result = cold_then_warm(run)
    lengths = [len(s) for s in sequences]
    flops = model_flops(shape, lengths, backward=True)
    return _record(STAGE_TRAIN, shape, seconds, mesh, kind, mode, tokens=sum(lengths), samples=len(lengths),
                   steps=result.steps, model_flops=flops, peak_tflops=None if peak_tflops is None else peak_tflops * n,
                   variant=f"{mode}-{kind}-{n}", batch_size=batch, cold_seconds=cold, remat=work.remat,
                   loss_first=result.history["loss"][0], loss_last=result.history["loss"][-1],
                   notes="warm fit (packed rows, one per batch shard), bf16 compute, fp32 AdamW on β and b; "
                         "MFU against n x the one-device bf16 peak")


STAGE_RUNNERS = {"capture": bench_capture, "train_step": bench_train}


def run_device_count(shape: Shape, n: int, kinds: Sequence[str], stages: Sequence[str], modes: Sequence[str],
                     n_max: int, work: ScalingWork, peak_tflops: float | None, out: str | None,
                     run_id: str, model: CausalLM | None = None) -> tuple[list[dict], CausalLM | None]:
    """Every (mesh, mode, stage) record for n devices, appended to `out` as they come; (records, the model).

    The random model is drawn sharded on the first mesh (or taken from `model`) and moved to each next one.
    """
    records = []
    for kind, sizes in plan_meshes(kinds, n):
        mesh = device_mesh(sizes)
        if model is None:
            model = random_sharded_model(shape, mesh, jnp.bfloat16, work.seed)
        else:
            model = reshard(model, mesh)
        for mode in modes:
            if mode == "strong" and n_max == 1:
                continue
            for stage in stages:
                log.info("=== %s %s on %s (%s, %s)", shape.name, stage, mesh_text(sizes), kind, mode)
                try:
                    rec = STAGE_RUNNERS[stage](model, shape, mesh, kind, mode, n_max, work, peak_tflops)
                except Exception as e:  # e.g. out of memory on one mesh: record it, go on with the next
                    log.exception("%s on %s failed", stage, mesh_text(sizes))
                    rec = failure_record(STAGE_CAPTURE if stage == "capture" else STAGE_TRAIN, shape, mesh, kind,
                                         mode, e)
                rec.update(run_id=run_id, work=dataclasses.asdict(work), n_max=n_max)
                records.append(rec)
                if out:
                    append_records(out, [rec], peak_tflops)
                print(f"RESULT {_line(rec)}" if rec.get("error") is None else
                      f"FAILED {shape.name} {rec['stage']} {kind} x{n}: {rec['error']}", flush=True)
    return records, model


def failure_record(stage: str, shape: Shape, mesh: Mesh, kind: str, mode: str, error: Exception) -> dict:
    """A record of a stage that raised (tokens_per_s None), so the report shows the gap and why."""
    peaks = device_peaks_gib(list(mesh.devices.flat))
    return {"stage": stage, "impl": "lcc_jax", "shape": shape.name, "seconds": None, "tokens_per_s": None,
            "samples_per_s": None, "steps_per_s": None, "mfu": None, "model_flops": None, "peak_mem_gib": None,
            "extrapolated": False, "devices": int(mesh.devices.size), "mesh": mesh_text(mesh.devices.shape),
            "mesh_kind": kind, "scaling": mode, "efficiency": None, "speedup": None,
            "peak_mem_gib_per_device": peaks, "error": error_text(error), "notes": "failed"}


def error_text(error: BaseException) -> str:
    """'Type: first line of the message' (at most 300 characters)."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"


# ---------------------------------------------------------------------------------- bookkeeping


def _pair_key(r: dict) -> tuple:
    """What a record and its 1-device baseline share: shape, stage, mode, per-device work (and n_max when strong)."""
    work = tuple(sorted((r.get("work") or {}).items()))
    return r["shape"], r["stage"], r["scaling"], work, r.get("n_max") if r["scaling"] == "strong" else None


def add_efficiency(records: Sequence[dict], baselines: Sequence[dict] = ()) -> list[dict]:
    """Records with `speedup` (tokens/s over the 1-device record's) and `efficiency` (speedup / devices) filled in.

    The 1-device partner is the first of `records` with the same `_pair_key`, else the last such record of
    `baselines` (earlier runs in the same report); without one, both stay None.
    """
    base = {}
    for r in baselines:
        if r.get("devices") == 1 and r.get("tokens_per_s") and "scaling" in r:
            base[_pair_key(r)] = r["tokens_per_s"]
    ours = {}
    for r in records:
        if r["devices"] == 1 and r.get("tokens_per_s"):
            ours.setdefault(_pair_key(r), r["tokens_per_s"])
    base.update(ours)
    out = []
    for r in records:
        one = base.get(_pair_key(r))
        speedup = r["tokens_per_s"] / one if one and r.get("tokens_per_s") else None
        out.append({**r, "speedup": speedup, "efficiency": None if speedup is None else speedup / r["devices"]})
    return out


def _fmt(value: float | None, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _pct(value: float | None, spec: str) -> str:
    return "-" if value is None else f"{100 * value:{spec}} %"


def _line(r: dict) -> str:
    peaks = r.get("peak_mem_gib_per_device") or []
    peak = _fmt(max((p for p in peaks if p is not None), default=None), ".1f", "n/a")
    return (f"{r['shape']} {r['stage']} {r['scaling']} {r['mesh_kind']} [{r['mesh']}] x{r['devices']}: "
            f"{r['tokens_per_s']:,.0f} tokens/s, MFU {_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}%, "
            f"efficiency {_fmt(r['efficiency'] and 100 * r['efficiency'], '.0f')}%, peak/device {peak} GiB")


def table(records: Sequence[dict]) -> str:
    """A markdown table of scaling records."""
    lines = ["| stage | scaling | mesh | devices | tokens/s | speed-up | efficiency | MFU | peak GiB/device |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {STAGE_CAPTURE: 0, STAGE_TRAIN: 1}
    for r in sorted(records, key=lambda r: (order.get(r["stage"], 9), r["scaling"], r["devices"],
                                            MESH_KINDS.index(r["mesh_kind"]) if r["mesh_kind"] in MESH_KINDS else -1)):
        peaks = [p for p in (r.get("peak_mem_gib_per_device") or []) if p is not None]
        peak = f"{max(peaks):.1f}" if peaks else "n/a"
        lines.append(
            f"| {r['stage'].removeprefix('scaling_')} | {r['scaling']} | {r['mesh_kind']} `{r['mesh']}` | "
            f"{r['devices']} | {_fmt(r['tokens_per_s'], ',.0f', 'failed: ' + str(r.get('error'))[:60])} | "
            f"{_fmt(r['speedup'], '.2f')}{'x' if r['speedup'] else ''} | {_pct(r['efficiency'], '.0f')} | "
            f"{_pct(r['mfu'], '.1f')} | {peak} |")
    return "\n".join(lines)


def finish_report(out: str, run_id: str) -> list[dict]:
    """Fill in efficiency for this run's records in `out` (rewritten in place); returns them.

    A run without 1-device records (e.g. `--devices 2,4`) is paired with an earlier run's in the same file."""
    report = read_report(out)
    ours = [r for r in report["records"] if r.get("run_id") == run_id]
    earlier = [r for r in report["records"] if r.get("run_id") != run_id]
    done = iter(add_efficiency(ours, earlier))
    report["records"] = [next(done) if r.get("run_id") == run_id else r for r in report["records"]]
    write_report(out, report)
    return [r for r in report["records"] if r.get("run_id") == run_id]


def plan(shape: Shape, counts: Sequence[int], kinds: Sequence[str]) -> str:
    """The sharding plan without devices: parameter GiB per device for each mesh (AbstractMesh)."""
    state = nnx.state(abstract_model(shape))
    total = sum(math.prod(v.shape) * jnp.dtype(v.dtype).itemsize for _, v in _flat(state))
    lines = [f"{shape.name}: {total / 2**30:.2f} GiB of bf16 parameters",
             "| devices | mesh | weights GiB/device | batch shards |", "|---|---|---|---|"]
    for n in counts:
        for kind, sizes in plan_meshes(kinds, n):
            mesh = abstract_mesh(sizes)
            try:
                per = weight_bytes_per_device(state, mesh) / 2**30
                shards = batch_shards(mesh)
                lines.append(f"| {n} | {kind} `{mesh_text(sizes)}` | {per:.2f} | {shards} |")
            except ShardingError as e:
                lines.append(f"| {n} | {kind} `{mesh_text(sizes)}` | does not divide: {str(e)[:80]} | |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- command line


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(ALL_SHAPES))
    parser.add_argument("--devices", default="1,2,4,8", help="device counts (capped at the devices present)")
    parser.add_argument("--meshes", default="fsdp,data,hybrid,tensor", help=f"mesh kinds of {MESH_KINDS}")
    parser.add_argument("--stages", default="capture,train_step")
    parser.add_argument("--modes", default="weak", help="weak (global size x N) and/or strong (fixed global size)")
    parser.add_argument("--out", default="results/scaling.json")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="ScalingWork override")
    parser.add_argument("--peak-tflops", type=float, default=None, help="one device's bf16 peak (default: measured)")
    parser.add_argument("--in-process", action="store_true", help="all device counts in this process")
    parser.add_argument("--plan", action="store_true", help="print the sharding plan only (no devices, no weights)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per device-count process")
    parser.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n-max", type=int, default=None,
                        help="strong scaling's fixed global size, in devices' worth (default: the largest count)")
    return parser.parse_args(argv)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    shape = get_any_shape(args.shape)
    counts = sorted({int(c) for c in _csv(args.devices)})
    kinds, stages, modes = _csv(args.meshes), _csv(args.stages), _csv(args.modes)
    for kind in kinds:
        mesh_sizes(kind, 1)  # validates the name
    if unknown := [s for s in stages if s not in STAGE_RUNNERS]:
        raise SystemExit(f"unknown stage(s) {unknown}; known: {', '.join(STAGE_RUNNERS)}")
    if args.plan:
        print(plan(shape, counts, kinds))
        return []
    run_id = args.run_id or uuid.uuid4().hex[:12]
    if not args.in_process and len(counts) > 1:
        return _spawn(args, counts, run_id)

    present = jax.device_count()
    runnable = [c for c in counts if c <= present]
    n_max = min(args.n_max or max(runnable, default=1), present)
    work = work_with(default_work(args.shape), args.set)
    peak = args.peak_tflops
    if peak is None:
        from benchmarks.common import measure_peak_tflops

        peak = measure_peak_tflops()
    records, model = [], None
    for n in counts:
        if n > present:
            log.warning("skipping %d devices: only %d present", n, present)
            continue
        new, model = run_device_count(shape, n, kinds, stages, modes, n_max, work, peak, args.out, run_id, model)
        records += new
    if args.run_id is None:  # the top-level process: efficiency and the table
        records = finish_report(args.out, run_id) if args.out else add_efficiency(records)
        print(table(records))
    return records


def _spawn(args: argparse.Namespace, counts: list[int], run_id: str) -> list[dict]:
    """One process per device count (clean per-device peaks), then efficiency over all of them. Touches no device."""
    n_max_hint = str(max(counts))
    for n in counts:
        cmd = [sys.executable, "-m", "benchmarks.scaling", "--shape", args.shape, "--devices", str(n), "--meshes",
               args.meshes, "--stages", args.stages, "--modes", args.modes, "--out", args.out, "--run-id", run_id,
               "--n-max", n_max_hint, "--in-process"]
        if args.peak_tflops is not None:
            cmd += ["--peak-tflops", str(args.peak_tflops)]
        for item in args.set:
            cmd += ["--set", item]
        log.info("$ %s", " ".join(shlex.quote(c) for c in cmd))
        started = time.perf_counter()
        try:
            status = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            status = 124
        log.info("%d device(s): exit %d after %.0f s", n, status, time.perf_counter() - started)
    if not Path(args.out).exists():
        raise SystemExit(f"no records were written to {args.out}")
    records = finish_report(args.out, run_id)
    print(table(records))
    return records


if __name__ == "__main__":
    main()
