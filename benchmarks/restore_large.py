"""A RestoreLCC restore of a model too large for one device: Llama-2-70B-shaped, random bf16, sharded.

Stages, each timed cold (compilation included, as a first run would be), with every device's peak and
live memory after it:

  init            random bf16 weights drawn where they live (fsdp over all devices): no device or host
                  ever holds a whole weight
  capture_dense   dense model on q, q+r⁺, q+r⁻ of the probing samples (`capture_last_token` on the mesh)
  prune           magnitude 2:4 on every prunable kernel, in place and shard-local (donated, no masks kept):
                  a cheap stand-in for Wanda / SparseGPT, which only changes what ΔZ holds
  capture_pruned  pruned model on q
  components      per-head SVD of ΔZ (`lost_components`, K = 10)
  probes          L·H contrastive probes, 200 epochs (`train_probes`)
  train           a few `fit` steps on β and b of the top 25 % of heads, on the mesh

`--dry-run` needs no device memory: the model is built abstractly (nnx.eval_shape) with its shardings
on a mesh of (fake) devices, the capture and train steps are lowered and compiled exactly as the real
run compiles them, and `memory_analysis()` gives each device's argument, output, temporary and aliased
bytes; with the parameter bytes per device that says whether the run fits a per-device budget.
Parameter bytes are exact. The compiled temporaries come from XLA's CPU compiler and overstate a GPU's:
it upcasts bf16 matmul operands to fp32 (whole stacked weights, ~2x their shard) and uses XLA attention
(seq x seq scores) where a GPU uses cuDNN flash attention. The SPMD partitioning itself (which arrays are
split, which collectives run) is the same pass on both, so a compiled plan that replicates activations
shows up here too. `estimate_bytes` gives the GPU figure by formula, for a well-partitioned step.

  python -m benchmarks.restore_large --shape llama2-70b --out results/restore_70b.json      # 8 GPUs
  python -m benchmarks.restore_large --dry-run --shape llama2-70b --devices 8                # any machine
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--dry-run" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""):
    # a dry run needs as many devices as its mesh: fake CPU devices, set before jax starts
    _count = sys.argv[sys.argv.index("--devices") + 1] if "--devices" in sys.argv else "8"
    _count = max(int(c) for c in _count.split(",") if c.strip())
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={_count}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from benchmarks.common import append_records, data, model_flops, record  # noqa: E402
from benchmarks.reference_torch.shapes import Shape  # noqa: E402
from benchmarks.scaling import (  # noqa: E402
    ALL_SHAPES,
    abstract_state,
    device_mesh,
    device_peaks_gib,
    error_text,
    get_any_shape,
    mesh_text,
    random_sharded_model,
    weight_bytes_per_device,
)
from lcc_jax.pruning.masks import prunable_paths  # noqa: E402
from lcc_jax.restore.config import RestoreConfig  # noqa: E402
from lcc_jax.restore.probe import ProbeConfig  # noqa: E402
from lcc_jax.restore.top_k import TopK  # noqa: E402
from lcc_jax.sharding import MeshSpec, batch_shards, flat_params  # noqa: E402

log = logging.getLogger("benchmarks")

STAGE = "restore_large"
PHASES = ("init", "capture_dense", "prune", "capture_pruned", "components", "probes", "train")
GB = 1e9


PAPER = RestoreConfig()  # the job's defaults: the sizes that are the job's come from here


@dataclasses.dataclass(frozen=True)
class RestoreWork:
    """Sizes of the large restore (global, over the whole mesh)."""

    seed: int = 0
    probe_samples: int = 128
    probe_max_len: int = PAPER.capture_length
    capture_batch: int = 64
    train_steps: int = 4
    train_batch: int = PAPER.batch_size
    train_min_len: int = 120
    train_max_len: int = PAPER.max_length
    top_k: TopK = PAPER.top_k
    components: int = PAPER.components
    probe_epochs: int = ProbeConfig().epochs
    remat: bool = PAPER.remat

    def replace(self, **changes) -> RestoreWork:
        return dataclasses.replace(self, **changes)


TINY_WORK = RestoreWork(probe_samples=16, probe_max_len=32, capture_batch=8, train_steps=2, train_batch=8,
                        train_min_len=8, train_max_len=30, probe_epochs=20)


def default_work(shape: str) -> RestoreWork:
    return TINY_WORK if shape == "tiny" else RestoreWork()


# ------------------------------------------------------------------------------------ pruning


@functools.partial(jax.jit, donate_argnums=0)
def _prune_2_4(w: jax.Array) -> jax.Array:
    """(..., in, out) with the 2 smallest |w| of every 4 consecutive inputs zeroed, per output.

    Element i of a group is pruned when its stable ascending rank (#smaller + #equal with a lower index)
    is below 2: the same keep set as `lcc_jax.pruning.masks.nm_mask(|w|, 2, 4)`, computed elementwise
    (shard-local, fused, nothing but the output).
    """
    *lead, d_in, d_out = w.shape
    g = jnp.abs(w.reshape(*lead, d_in // 4, 4, d_out).astype(jnp.float32))  # (..., in/4, 4, out)
    a, b = g[..., :, None, :], g[..., None, :, :]  # element i vs element j of its group
    lower = (jnp.arange(4)[None, :] < jnp.arange(4)[:, None])[:, :, None]  # j < i
    rank = jnp.sum((b < a) | ((b == a) & lower), axis=-2)  # (..., in/4, 4, out)
    keep = (rank >= 2).reshape(w.shape)
    return jnp.where(keep, w, jnp.zeros((), w.dtype))


def prune_2_4(model: nnx.Module) -> list[str]:
    """Magnitude 2:4 on every prunable kernel of `model`, in place, each kernel keeping its sharding."""
    flat = flat_params(model)
    paths = prunable_paths(flat)
    for path in paths:
        var = flat[path]
        old = var[...]
        sharding = old.sharding
        var.set_value(jax.device_put(_prune_2_4(old), sharding))  # `old` is donated
    return paths


# ------------------------------------------------------------------------------------ the real run


def _memory(devices: Sequence[jax.Device]) -> dict[str, list[float | None]]:
    peaks = device_peaks_gib(devices)
    live = []
    for device in devices:
        stats = device.memory_stats() or {}
        live.append(stats["bytes_in_use"] / 2**30 if "bytes_in_use" in stats else None)
    return {"peak_gib": peaks, "in_use_gib": live}


def run(shape: Shape, mesh: Mesh, work: RestoreWork, peak_tflops: float | None = None) -> dict[str, Any]:
    """The whole restore on `mesh`; one record (shared schema) with per-phase seconds and memory."""
    from lcc_jax.baselines.bias_only import apply_compensation
    from lcc_jax.restore.capture import capture_last_token
    from lcc_jax.restore.compensation import init_compensation, split_trainable
    from lcc_jax.restore.components import lost_components
    from lcc_jax.restore.probe import ProbeConfig, train_probes
    from lcc_jax.train import TrainConfig, epoch_batches, fit

    devices = list(mesh.devices.flat)
    phases: dict[str, float] = {}
    memory: dict[str, dict] = {}

    @contextlib.contextmanager
    def phase(name: str):
        started = time.perf_counter()
        yield
        phases[name] = time.perf_counter() - started
        memory[name] = _memory(devices)
        peak = [p for p in memory[name]["peak_gib"] if p is not None]
        log.info("%s %s: %.1f s, peak %s GiB/device", shape.name, name, phases[name],
                 f"{max(peak):.1f}" if peak else "n/a")

    queries, positives, negatives = data.probing_triples(work.probe_samples, shape.vocab_size, work.seed,
                                                         work.probe_max_len)
    samples = data.training_samples(work.train_steps * work.train_batch, shape.vocab_size, work.seed + 1,
                                    work.train_min_len, work.train_max_len)

    def capture(model, seqs, desc):
        return capture_last_token(model, seqs, work.capture_batch, mesh=mesh, max_length=work.probe_max_len,
                                  desc=desc)

    done: dict[str, Any] = {}
    try:
        with phase("init"):
            model = done["model"] = random_sharded_model(shape, mesh, jnp.bfloat16, work.seed)
        with phase("capture_dense"):
            dense_q = capture(model, queries, "dense q")
            positive = capture(model, positives, "dense q+r+")
            negative = capture(model, negatives, "dense q+r-")
        with phase("prune"):
            done["pruned_kernels"] = prune_2_4(model)
            jax.block_until_ready(nnx.state(model))
        with phase("capture_pruned"):
            pruned_q = capture(model, queries, "pruned q")
        with phase("components"):
            components = lost_components(dense_q, pruned_q, k=work.components)
        with phase("probes"):
            probes = train_probes(pruned_q, components.component, positive, negative,
                                  ProbeConfig(epochs=work.probe_epochs))
        with phase("train"):
            comp = init_compensation(components.basis, probes.ranking, work.top_k, jax.random.key(work.seed))
            done["compensated_heads"] = int(comp.num_heads)
            trainable, frozen = split_trainable(comp)
            sequences = [s.ids.astype(np.int32) for s in samples]
            masks = [np.r_[np.zeros(s.prompt_len), np.ones(len(s) - s.prompt_len)].astype(np.float32)
                     for s in samples]
            config = TrainConfig(epochs=1, batch_size=work.train_batch, seed=work.seed, log_every=1, remat=work.remat)
            trained = fit(model, trainable, apply_compensation, epoch_batches(sequences, masks, config, pad_id=0),
                          config, constants=frozen, mesh=mesh)
            jax.block_until_ready(trained.trainable)
            done.update(train_steps=trained.steps, loss_first=trained.history["loss"][0],
                        loss_last=trained.history["loss"][-1])
    except Exception as e:  # out of memory, say: keep what was measured, and say where it stopped
        failed = next(name for name in PHASES if name not in phases)
        log.exception("%s: phase %s failed", shape.name, failed)
        memory[failed] = _memory(devices)
        done.update(error=error_text(e), failed_phase=failed)

    n = len(devices)
    finished = "error" not in done
    flops = None
    if finished:
        capture_lengths = [len(s) for s in (*queries, *positives, *negatives, *queries)]
        flops = (model_flops(shape, capture_lengths, backward=False, lm_head=False)
                 + model_flops(shape, [len(s) for s in samples], backward=True))
    rec = record("job", shape.name, sum(phases.values()), model_flops=flops,
                 peak_tflops=None if peak_tflops is None else peak_tflops * n, variant=f"fsdp{n}")
    last = memory[PHASES[-1] if finished else done["failed_phase"]]["peak_gib"]
    peaks = [p for p in last if p is not None]
    model = done.pop("model", None)
    rec.update(stage=STAGE, devices=n, mesh=mesh_text(mesh.devices.shape), phases=phases, phase_memory_gib=memory,
               peak_mem_gib=max(peaks) if peaks else None, peak_mem_gib_per_device=last,
               peak_mem_kind="process peak of each device up to the end of each phase (phase_memory_gib)",
               probe_samples=work.probe_samples, probe_max_len=work.probe_max_len, capture_batch=work.capture_batch,
               train_batch=work.train_batch, remat=work.remat, heads=int(shape.total_heads),
               weights_gib_per_device=(None if model is None
                                       else weight_bytes_per_device(nnx.state(model), mesh) / 2**30),
               notes="random bf16 weights drawn sharded; magnitude 2:4 stand-in for pruning; every phase cold "
                     "(compilation included); MFU against n x the one-device bf16 peak", **done)
    return rec


def phase_table(rec: dict[str, Any]) -> str:
    lines = ["| phase | seconds | peak GiB/device (max) | in use GiB/device (max) |", "|---|---|---|---|"]
    for name in PHASES:
        if name not in rec["phases"]:
            continue
        mem = rec["phase_memory_gib"][name]
        peak = [p for p in mem["peak_gib"] if p is not None]
        live = [p for p in mem["in_use_gib"] if p is not None]
        lines.append(f"| {name} | {rec['phases'][name]:.1f} | {f'{max(peak):.1f}' if peak else 'n/a'} | "
                     f"{f'{max(live):.1f}' if live else 'n/a'} |")
    if rec.get("error"):
        mem = rec["phase_memory_gib"][rec["failed_phase"]]
        peak = [p for p in mem["peak_gib"] if p is not None]
        lines.append(f"| {rec['failed_phase']} | **failed**: {rec['error'][:120]} | "
                     f"{f'{max(peak):.1f}' if peak else 'n/a'} | |")
    lines.append(f"| **total** | {rec['seconds']:.1f} | | |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the dry run


def _replicated(mesh: Mesh, tree: Any) -> Any:
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)


def _stats(compiled) -> dict[str, int] | None:
    """Per-device bytes of a compiled SPMD program (None where the backend has no memory analysis)."""
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001  (backends without it raise various errors)
        log.warning("memory_analysis unavailable: %s", e)
        return None
    if m is None:
        return None
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    out["generated_code"] = int(getattr(m, "generated_code_size_in_bytes", 0))
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"] + out["generated_code"]
    return out


def _round_up(x: int, multiple: int) -> int:
    return max(multiple, -(-x // multiple) * multiple)


def init_program(shape: Shape, mesh: Mesh, work: RestoreWork, *, compile: bool = True):
    """`random_sharded_model`'s per-parameter draws, lowered (and compiled); they run one after another.

    Returns a stand-in with `memory_analysis()`: output = all weight shards, temp = the largest draw's.
    """
    from benchmarks.scaling import _init_kinds, drawer, state_shardings

    _, abstract = abstract_state(shape, mesh)
    shardings = jax.tree.leaves(state_shardings(abstract, mesh))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    programs = []
    with jax.set_mesh(mesh):
        for leaf, sharding, kind in zip(jax.tree.leaves(abstract), shardings, _init_kinds(abstract)):
            lowered = drawer(tuple(leaf.shape), jnp.dtype(leaf.dtype), sharding, kind).lower(key)
            programs.append(lowered.compile() if compile else lowered)
    return (_Sequential(programs) if compile else programs), ()


@dataclasses.dataclass
class _Sequential:
    """Memory of programs run one after another: outputs add up (they stay), temporaries do not."""

    programs: list

    def memory_analysis(self):
        stats = [p.memory_analysis() for p in self.programs]
        fields = ("argument", "output", "alias", "temp", "generated_code")
        total = {f: sum(getattr(s, f"{f}_size_in_bytes") for s in stats) for f in fields}
        total["temp"] = max(s.temp_size_in_bytes for s in stats)
        total["argument"] = max(s.argument_size_in_bytes for s in stats)
        return type("Stats", (), {f"{f}_size_in_bytes": v for f, v in total.items()})()


def capture_program(shape: Shape, mesh: Mesh, work: RestoreWork, *, compile: bool = True):
    """The capture step as `capture_last_token` jits it, lowered (and compiled) for its largest batch."""
    from lcc_jax.data.runner import _jitted
    from lcc_jax.restore.capture import _tokens_and_mask, capture_buckets, last_token_heads

    graphdef, state = abstract_state(shape, mesh)
    batch = -(-work.capture_batch // batch_shards(mesh)) * batch_shards(mesh)
    seq = capture_buckets(work.probe_max_len)[-1]
    spec = jax.ShapeDtypeStruct((batch, seq), jnp.int32,
                                sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None)))
    with jax.set_mesh(mesh):
        lowered = _jitted(graphdef, _tokens_and_mask(last_token_heads)).lower(state, dict(tokens=spec, mask=spec), {})
        return (lowered.compile() if compile else lowered), (batch, seq)


def train_program(shape: Shape, mesh: Mesh, work: RestoreWork, *, compile: bool = True):
    """The trainer's step (lcc_jax.train.steps) lowered (and compiled) for a packed (1, rows, seq) batch."""
    from lcc_jax.baselines.bias_only import apply_compensation
    from lcc_jax.restore.compensation import Compensation
    from lcc_jax.restore.top_k import TopK
    from lcc_jax.train import TrainConfig
    from lcc_jax.train.steps import _compiled, _step_relevant

    graphdef, state = abstract_state(shape, mesh)
    config = TrainConfig(epochs=1, batch_size=work.train_batch, seed=work.seed, remat=work.remat)
    k, d = TopK.parse(work.top_k).resolve(shape.total_heads), shape.head_dim
    f32 = jnp.float32
    frozen_comp = Compensation(basis=jax.ShapeDtypeStruct((k, d, d), f32), beta=None, bias=None,
                               heads=jax.ShapeDtypeStruct((k,), jnp.int32), mode="full")
    trainable = {"beta": jax.ShapeDtypeStruct((k, d), f32), "bias": jax.ShapeDtypeStruct((k, d), f32)}
    optimizer, step, _ = _compiled(graphdef, apply_compensation, _step_relevant(config), work.train_steps,
                                   work.train_batch)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    trainable, frozen_comp, opt_state = (_replicated(mesh, t) for t in (trainable, frozen_comp, opt_state))
    rows = batch_shards(mesh)
    per_row = -(-work.train_batch // rows)  # samples packed into each row, at most train_max_len each
    seq = _round_up(per_row * work.train_max_len, 256)
    sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None))
    arrays = {name: jax.ShapeDtypeStruct((1, rows, seq), dtype, sharding=sharding)
              for name, dtype in (("tokens", jnp.int32), ("attention_mask", jnp.int32), ("loss_mask", f32))}
    out_shardings = (jax.tree.map(lambda x: x.sharding, trainable), jax.tree.map(lambda x: x.sharding, opt_state),
                     None)
    jitted = jax.jit(step, donate_argnums=(1, 2), out_shardings=out_shardings)
    with jax.set_mesh(mesh):
        lowered = jitted.lower((state, frozen_comp), trainable, opt_state, arrays)
        return (lowered.compile() if compile else lowered), (1, rows, seq)


def estimate_bytes(shape: Shape, sizes: Sequence[int], work: RestoreWork, weights: int) -> dict[str, int]:
    """Per-device bytes of the capture and train steps on a GPU, by formula (an estimate, not a measurement).

    Assumes what a good SPMD plan does: activations split over the batch axes (data x fsdp), each layer's
    weights all-gathered over fsdp one layer at a time (this one and the next in flight), bf16 activations,
    flash attention (no seq x seq scores), and no remat unless `work.remat`. With T tokens per device:
      capture  weights + 2 gathered layers + one layer's activations T·(3E + 2(H+2K)d/t + 3I/t)·2
               + the captured heads L·b·H·d·4
      train    weights + 2 gathered layers + L saved layers T·(4E + 2(H+2K)d/t + 3I/t)·2 (T·E·2 with remat)
               + logits and their fp32 gradient T·V/t·10 + two layers' working set
    """
    data_size, fsdp, tensor = sizes
    shards = data_size * fsdp
    e, i, v, layers = shape.hidden_size, shape.intermediate_size, shape.vocab_size, shape.num_layers
    qkv = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
    gathered = 2 * shape.layer_params() * 2 // tensor if fsdp > 1 else 0
    rows = -(-work.capture_batch // shards)
    from lcc_jax.restore.capture import capture_buckets

    tokens = rows * capture_buckets(work.probe_max_len)[-1]
    layer = tokens * (3 * e + 2 * qkv // tensor + 3 * i // tensor) * 2
    heads = layers * rows * shape.num_heads * shape.head_dim * 4
    capture = weights + gathered + layer + heads
    seq = _round_up(-(-work.train_batch // shards) * work.train_max_len, 256)  # one packed row per device
    saved = seq * e * 2 if work.remat else seq * (4 * e + 2 * qkv // tensor + 3 * i // tensor) * 2
    train_layer = seq * (3 * e + 2 * qkv // tensor + 3 * i // tensor) * 2
    train = weights + gathered + layers * saved + seq * v // tensor * 10 + 2 * train_layer
    return {"capture": int(capture), "train": int(train)}


def dry_run(shape: Shape, sizes: Sequence[int], work: RestoreWork, budgets_gb: Sequence[float],
            compile: bool = True) -> dict[str, Any]:
    """Per-device bytes of weights, the capture step and the train step on a mesh of `sizes`; no weights made."""
    mesh = device_mesh(sizes)
    _, state = abstract_state(shape, mesh)
    weights = weight_bytes_per_device(state, mesh)
    total_params = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
    out: dict[str, Any] = {"shape": shape.name, "mesh": mesh_text(sizes), "devices": math.prod(sizes),
                           "weights_bytes_total": int(total_params), "weights_bytes_per_device": int(weights),
                           "compiled": compile, "backend": jax.default_backend()}
    for name, build in (("init", init_program), ("capture", capture_program), ("train", train_program)):
        started = time.perf_counter()
        program, batch_shape = build(shape, mesh, work, compile=compile)
        out[name] = {"batch_shape": list(batch_shape), "seconds": time.perf_counter() - started,
                     "bytes": _stats(program) if compile else None}
        log.info("dry run %s %s on %s: %s in %.1f s", shape.name, name, out["mesh"], out[name]["bytes"],
                 out[name]["seconds"])
    estimate = estimate_bytes(shape, sizes, work, weights)
    out["estimate_bytes"] = estimate
    worst = max((out[n]["bytes"] or {}).get("total", weights) for n in ("capture", "train"))
    out["peak_bytes_per_device"] = int(worst) if compile else None
    out["estimate_peak_bytes_per_device"] = max(estimate.values())
    out["fits"] = {f"{b:g} GB": worst <= b * GB for b in budgets_gb} if compile else None
    out["fits_estimate"] = {f"{b:g} GB": max(estimate.values()) <= b * GB for b in budgets_gb}
    return out


def dry_table(results: Sequence[dict[str, Any]], budgets_gb: Sequence[float]) -> str:
    """Markdown: per-device GiB of weights, the compiled steps (args / temp / total) and the GPU estimate."""
    head = ("| mesh | weights GiB/dev | init: out / temp GiB | capture: args / temp / total GiB (compiled) | "
            "capture est. GiB | "
            "train: args / temp / total GiB (compiled) | train est. GiB | "
            + " | ".join(f"fits {b:g} GB (compiled / est.)" for b in budgets_gb) + " |")
    lines = [head, "|" + "---|" * (7 + len(budgets_gb))]
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    yes = lambda ok: "-" if ok is None else ("yes" if ok else "**no**")  # noqa: E731
    for r in results:
        cells = [f"`{r['mesh']}`", gib(r["weights_bytes_per_device"])]
        init = r["init"]["bytes"]
        cells.append("not compiled" if init is None else f"{gib(init['output'])} / {gib(init['temp'])}")
        for name in ("capture", "train"):
            s = r[name]["bytes"]
            cells.append("not compiled" if s is None
                         else f"{gib(s['argument'])} / {gib(s['temp'])} / {gib(s['total'])}")
            cells.append(gib(r["estimate_bytes"][name]))
        for b in budgets_gb:
            key = f"{b:g} GB"
            cells.append(f"{yes(r['fits'][key] if r['fits'] else None)} / {yes(r['fits_estimate'][key])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ command line


def _work_with(work: RestoreWork, settings: Sequence[str]) -> RestoreWork:
    fields = {f.name for f in dataclasses.fields(RestoreWork)}
    changes: dict[str, Any] = {}
    for item in settings:
        key, _, text = item.partition("=")
        if key not in fields:
            raise ValueError(f"unknown field {key!r}; known: {', '.join(sorted(fields))}")
        current = getattr(work, key)
        changes[key] = (text.lower() in ("1", "true", "yes") if isinstance(current, bool)
                        else TopK.parse(text) if isinstance(current, TopK)
                        else float(text) if isinstance(current, float) else int(text))
    return work.replace(**changes)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama2-70b", choices=sorted(ALL_SHAPES))
    parser.add_argument("--mesh", default="fsdp=-1", help="mesh over all devices (or --devices of them)")
    parser.add_argument("--devices", default=None, help="device count(s); dry run: one mesh per count, fsdp only")
    parser.add_argument("--out", default=None, help="JSON report to append to")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="RestoreWork override")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--dry-run", action="store_true", help="abstract model, compiled steps, bytes per device")
    parser.add_argument("--lower-only", action="store_true", help="dry run without compiling (parameter bytes only)")
    parser.add_argument("--budget-gb", default="141,80", help="per-device budgets for the dry run (GB = 1e9 bytes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    shape = get_any_shape(args.shape)
    work = _work_with(default_work(args.shape), args.set)
    counts = [int(c) for c in args.devices.split(",")] if args.devices else [jax.device_count()]

    if args.dry_run:
        budgets = [float(b) for b in args.budget_gb.split(",") if b.strip()]
        results = []
        for n in counts:
            sizes = MeshSpec.parse(args.mesh).resolve(n)
            results.append(dry_run(shape, sizes, work, budgets, compile=not args.lower_only))
        print(f"dry run: {shape.name}, {jax.default_backend()} backend, {jax.device_count()} devices; "
              f"capture batch {results[0]['capture']['batch_shape']}, train batch {results[0]['train']['batch_shape']}")
        print(dry_table(results, budgets))
        if args.out:
            from benchmarks.schema import read_report, write_report

            report = read_report(args.out) if os.path.exists(args.out) else {"records": []}
            report.setdefault("dry_runs", []).extend(results)
            write_report(args.out, report)
        return results

    if len(counts) != 1:
        raise SystemExit("a real run takes one device count")
    sizes = MeshSpec.parse(args.mesh).resolve(counts[0])
    mesh = device_mesh(sizes)
    peak = args.peak_tflops
    if peak is None:
        from benchmarks.common import measure_peak_tflops

        peak = measure_peak_tflops()
    rec = run(shape, mesh, work, peak)
    if args.out:
        append_records(args.out, [rec], peak)
    peak = "n/a" if rec["peak_mem_gib"] is None else f"{rec['peak_mem_gib']:.1f}"
    status = f"FAILED in {rec['failed_phase']}" if rec.get("error") else "done"
    print(f"RESULT {shape.name} restore on {rec['mesh']}: {status}, {rec['seconds']:.1f} s, peak {peak} GiB/device")
    print(phase_table(rec))
    if rec.get("error"):
        sys.exit(1)
    return [rec]


if __name__ == "__main__":
    main()
