"""Stages (d): SparseGPT on one decoder layer (`sparsegpt_layer`) and on the model (`sparsegpt_model`).

Both run `lcc_jax.prune(method="sparsegpt")` on the reference's random calibration windows:
per layer, Hessians of the four linear inputs (fp32), the shared inverse factors, the column-by-column
pruning of the seven kernels, and the pruned layer's forward for the next layer's inputs.
  * sparsegpt_layer: a one-layer model of the shape, run twice per pattern; the record is the second
    (warm) run, `cold_seconds` the first (with compilation). The embedding lookup is the only extra.
  * sparsegpt_model: a fresh model of the first `sparsegpt_model_layers` layers (all by default), one
    cold run. When truncated, the full model's time is extrapolated as this run plus the remaining
    layers at the warm one-layer time, and the record says so (`extrapolated`).

  python -m benchmarks.sparsegpt --shape llama2-7b --stages sparsegpt_layer,sparsegpt_model --out r.json
"""

from __future__ import annotations

import dataclasses
import logging

from benchmarks.common import data, random_model, record
from benchmarks.wanda import timed_prune
from benchmarks.workload import Context
from lcc_jax.pruning.api import PruneConfig

log = logging.getLogger("benchmarks")


def _config(pattern: str, batch_size: int) -> PruneConfig:
    return PruneConfig(method="sparsegpt", sparsity="0.5" if pattern == "unstructured" else pattern,
                       batch_size=batch_size)


def _layer_times(ctx: Context, pattern: str) -> tuple[float, float]:
    """(cold, warm) seconds of SparseGPT on a one-layer model of the shape."""
    w = ctx.work
    layer = random_model(dataclasses.replace(ctx.shape, num_layers=1), seed=w.seed)
    calibration = data.calibration_tokens(w.nsamples, w.seqlen, ctx.shape.vocab_size, w.seed)
    cold = timed_prune(layer, calibration, _config(pattern, w.prune_batch))
    warm = timed_prune(layer, calibration, _config(pattern, w.prune_batch))
    return cold, warm


def bench_layer(ctx: Context) -> list[dict]:
    w, shape = ctx.work, ctx.shape
    out = []
    for pattern in w.layer_patterns:
        cold, warm = _layer_times(ctx, pattern)
        log.info("sparsegpt layer %s %s: %.2f s (cold %.2f s)", shape.name, pattern, warm, cold)
        out.append(record("sparsegpt_layer", shape.name, warm, tokens=w.nsamples * w.seqlen, samples=w.nsamples,
                          variant=pattern, nsamples=w.nsamples, seqlen=w.seqlen, cold_seconds=cold,
                          notes="one decoder layer (a one-layer model: embedding lookup included); blocksize 128, "
                                "percdamp .01; second run (cold_seconds: the first, with compilation)"))
    return out


def bench_model(ctx: Context) -> list[dict]:
    w, shape = ctx.work, ctx.shape
    layers = min(w.sparsegpt_model_layers or shape.num_layers, shape.num_layers)
    calibration = data.calibration_tokens(w.nsamples, w.seqlen, shape.vocab_size, w.seed)
    out = []
    for pattern in w.model_patterns:
        model = random_model(dataclasses.replace(shape, num_layers=layers), seed=w.seed)
        seconds = timed_prune(model, calibration, _config(pattern, w.prune_batch))
        del model
        extra = {"variant": pattern, "nsamples": w.nsamples, "seqlen": w.seqlen, "layers_run": layers}
        if layers == shape.num_layers:
            out.append(record("sparsegpt_model", shape.name, seconds, tokens=w.nsamples * w.seqlen,
                              samples=w.nsamples, notes="whole model, one run including compilation", **extra))
            continue
        _, warm = _layer_times(ctx, pattern)
        full = seconds + (shape.num_layers - layers) * warm
        log.info("sparsegpt model %s %s: %d layers in %.2f s, full model ~%.1f s", shape.name, pattern, layers,
                 seconds, full)
        out.append(record("sparsegpt_model", shape.name, full, tokens=w.nsamples * w.seqlen, samples=w.nsamples,
                          extrapolated=True, measured_seconds=seconds, layer_seconds=warm,
                          notes=f"EXTRAPOLATED: the first {layers} layers measured (with compilation), the other "
                                f"{shape.num_layers - layers} at the warm one-layer time", **extra))
    return out


if __name__ == "__main__":
    from benchmarks.worker import main

    main(default_stages=("sparsegpt_layer", "sparsegpt_model"))
