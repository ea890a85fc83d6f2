"""Stage (c): Wanda (50 % unstructured) on the whole model, layer by layer, as `lcc_jax.prune` runs it.

Calibration: the reference's random windows (nsamples × seqlen tokens). Two runs on the same model:
the first compiles (`cold_seconds`), the record is the second (speed does not depend on the weights'
values, so pruning an already pruned model is the same work). FLOPs: the two forward passes over the
calibration tokens (statistics, then the pruned layer's outputs), without lm_head.

  python -m benchmarks.wanda --shape llama2-7b --out results/wanda.json
"""

from __future__ import annotations

import logging
import time

import jax
from flax import nnx

from benchmarks.common import data, model_flops, record
from benchmarks.workload import Context
from lcc_jax.pruning.api import PruneConfig, prune

log = logging.getLogger("benchmarks")


def timed_prune(model, calibration, config: PruneConfig) -> float:
    """Wall seconds of `prune`, until the pruned weights are on the device."""
    started = time.perf_counter()
    result = prune(model, calibration, config)
    jax.block_until_ready((nnx.state(result.model), result.masks))
    return time.perf_counter() - started


def bench(ctx: Context) -> list[dict]:
    w, shape = ctx.work, ctx.shape
    calibration = data.calibration_tokens(w.nsamples, w.seqlen, shape.vocab_size, w.seed)
    flops = 2 * model_flops(shape, [w.seqlen] * w.nsamples, backward=False, lm_head=False)
    out = []
    for pattern in w.model_patterns:
        config = PruneConfig(method="wanda", sparsity="0.5" if pattern == "unstructured" else pattern,
                             batch_size=w.prune_batch)
        cold = timed_prune(ctx.model, calibration, config)
        seconds = timed_prune(ctx.model, calibration, config)
        log.info("wanda %s %s: %.2f s (cold %.2f s)", shape.name, pattern, seconds, cold)
        out.append(record("wanda", shape.name, seconds, tokens=w.nsamples * w.seqlen, samples=w.nsamples,
                          model_flops=flops, peak_tflops=ctx.peak_tflops, variant=pattern, nsamples=w.nsamples,
                          seqlen=w.seqlen, cold_seconds=cold,
                          notes=f"calibration in batches of {w.prune_batch}; second run (cold_seconds: the first, "
                                "with compilation); tokens/s = calibration tokens"))
    return out


if __name__ == "__main__":
    from benchmarks.worker import main

    main(default_stages=("wanda",))
