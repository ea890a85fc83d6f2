"""What every lcc_jax benchmark shares: shapes and FLOPs, random bf16 models built on the device, the
measured bf16 peak, timing, peak device memory, and the JSON records.

Shapes, the FLOP formula (`model_flops`) and the synthetic data come from the PyTorch reference's
torch-free modules (`benchmarks.reference_torch.shapes` and `.data`), so both sides count the same
FLOPs over the very same token sequences.

Peak memory is `device.memory_stats()["peak_bytes_in_use"]`, which JAX cannot reset: a record holds
the peak of its process up to the end of its stage (`peak_mem_kind`). `benchmarks.run` runs the
whole job in a process of its own, and `--isolate` gives every stage one.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.reference_torch import data  # noqa: F401  (re-exported: the shared synthetic sequences)
from benchmarks.reference_torch.shapes import SHAPES, Shape, get_shape, model_flops  # noqa: F401
from benchmarks.schema import STAGES, read_report, write_report
from lcc_jax.config import ModelConfig, RopeConfig
from lcc_jax.models import CausalLM

log = logging.getLogger("benchmarks")

IMPL = "lcc_jax"


def model_config(shape: Shape) -> ModelConfig:
    """The lcc_jax config of a named shape (a plain Llama: no biases, pad 0, bos 1, eos 2)."""
    return ModelConfig(
        model_type="llama", vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_layers=shape.num_layers, num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim, rms_norm_eps=shape.rms_norm_eps,
        rope=RopeConfig(theta=shape.rope_theta), max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def random_model(shape: Shape, dtype=jnp.bfloat16, seed: int = 0) -> CausalLM:
    """A CausalLM of `shape` with random weights made on the device in `dtype` (no fp32 or host copy).

    The model is traced abstractly, then one jitted function draws every weight where it will live,
    committed to the first device as a loaded checkpoint's weights are (`lcc_jax.load`).
    """
    config = model_config(shape)
    started = time.perf_counter()
    make = lambda: CausalLM(config, dtype=dtype, rngs=nnx.Rngs(seed))  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = jax.jit(lambda: nnx.state(make()), out_shardings=device)()
    jax.block_until_ready(state)
    log.info("random %s model (%s) on %s in %.1f s", shape.name, jnp.dtype(dtype).name, jax.devices()[0].device_kind,
             time.perf_counter() - started)
    return nnx.merge(graphdef, state)


def measure_peak_tflops(size: int | None = None, iters: int = 50) -> float:
    """Achieved bf16 TFLOP/s of `iters` chained size³ matmuls, the denominator of MFU: the faster of two forms.

    Measured in this process, on this device, before the stages. Random inputs (zeros run faster).
    The forms: bf16 out (XLA's default GEMM, fp32 accumulation inside) and an explicit fp32 result cast
    back to bf16, as the model's matmuls may be written.
    """
    if size is None:
        size = 8192 if jax.default_backend() != "cpu" else 512
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (size, size), jnp.bfloat16)
    # cast after scaling: dividing by a numpy scalar made `b` fp32, and the first H200 runs timed a mixed
    # bf16 x fp32 product (355 TFLOP/s, half the real peak, so their MFU read about 2x too high)
    b = (jax.random.normal(kb, (size, size), jnp.float32) / np.sqrt(size)).astype(jnp.bfloat16)

    def bf16_out(y, w):
        return jnp.dot(y, w)

    def fp32_out_cast(y, w):
        return jnp.dot(y, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)

    rates = {}
    for name, product in (("bf16 out", bf16_out), ("fp32 out, cast", fp32_out_cast)):
        def run(x, w, product=product):
            return jax.lax.fori_loop(0, iters, lambda _, y: product(y, w), x)

        chain = jax.jit(run)
        jax.block_until_ready(chain(a, b))
        seconds = min(timed(lambda chain=chain: chain(a, b)) for _ in range(3))
        rates[name] = 2.0 * size**3 * iters / seconds / 1e12
    log.info("bf16 matmul peak (%d³ x %d): %s", size, iters, ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in rates.items()))
    return max(rates.values())


def cold_then_warm(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(seconds of a first call, compilation included; seconds of a second call; the second call's result).

    `fn` must block until its work is done (return ready arrays or call `jax.block_until_ready`)."""
    started = time.perf_counter()
    fn()
    cold = time.perf_counter() - started
    started = time.perf_counter()
    result = fn()
    return cold, time.perf_counter() - started, result


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of `fn()` until every array it returns is ready."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def memory() -> dict[str, float | None]:
    """{"peak_gib", "in_use_gib"} of the first device (None where the backend keeps no statistics)."""
    stats = jax.devices()[0].memory_stats() or {}
    gib = lambda key: stats[key] / 2**30 if key in stats else None  # noqa: E731
    return {"peak_gib": gib("peak_bytes_in_use"), "in_use_gib": gib("bytes_in_use")}


def mfu(flops: float | None, seconds: float, peak_tflops: float | None) -> float | None:
    if flops is None or not peak_tflops or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)


def record(stage: str, shape: str, seconds: float, *, tokens: float | None = None, samples: float | None = None,
           steps: float | None = None, model_flops: float | None = None,  # noqa: F811 (a keyword of record)
           peak_tflops: float | None = None,
           extrapolated: bool = False, notes: str = "", **extra: Any) -> dict[str, Any]:
    """One measurement in the shared schema; rates are counts over `seconds`, MFU against `peak_tflops`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {STAGES}")

    def rate(count):
        return None if count is None or seconds <= 0 else count / seconds

    mem = memory()
    extra.setdefault("attention", os.environ.get("LCC_ATTENTION", "auto"))
    if os.environ.get("LCC_BENCH_RETRY"):  # benchmarks.run ran this worker again after a failure (RETRY_ENV)
        extra.setdefault("retried", os.environ["LCC_BENCH_RETRY"])
    return {"stage": stage, "impl": IMPL, "shape": shape, "seconds": seconds, "tokens_per_s": rate(tokens),
            "samples_per_s": rate(samples), "steps_per_s": rate(steps),
            "mfu": mfu(model_flops, seconds, peak_tflops), "model_flops": model_flops,
            "peak_mem_gib": mem["peak_gib"], "peak_mem_kind": "process peak up to the end of this stage",
            "extrapolated": extrapolated, "notes": notes, **extra}


def device_name() -> str:
    device = jax.devices()[0]
    return device.device_kind if device.platform != "cpu" else f"cpu ({platform.machine()})"


def versions() -> dict[str, str | None]:
    import flax
    import jaxlib
    import optax

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "backend": jax.default_backend(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def append_records(path: str | os.PathLike, records: list[dict[str, Any]], peak_tflops: float | None) -> None:
    """Add `records` to the report at `path` (created if absent), atomically, so a killed run keeps them."""
    path = Path(path)
    report = read_report(path) if path.exists() else {
        "device": device_name(), "versions": versions(), "peak_bf16_tflops": peak_tflops,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "records": []}
    report["records"].extend(records)
    if report.get("peak_bf16_tflops") is None:
        report["peak_bf16_tflops"] = peak_tflops
    write_report(path, report)
