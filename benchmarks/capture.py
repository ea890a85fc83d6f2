"""Stage (a): forward passes with per-head last-token capture (RestoreLCC's activation collection).

`capture_last_token` on the reference's capture set (Alpaca-prompt-like lengths), in length buckets.
The first call compiles every bucket shape and runs once (`cold_seconds`); the record is the second,
warm call, end to end: batching on the host, the forward, and the (N, L·H, d_h) fp32 result on the host.
FLOPs: 2·(decoder matmul params)·real tokens + causal attention, no lm_head (no logits are computed).

  python -m benchmarks.capture --shape llama2-7b --out results/capture.json
"""

from __future__ import annotations

import logging

from benchmarks.common import cold_then_warm, data, model_flops, record
from benchmarks.workload import Context
from lcc_jax.restore.capture import capture_last_token

log = logging.getLogger("benchmarks")


def bench(ctx: Context) -> list[dict]:
    w, shape = ctx.work, ctx.shape
    lengths = data.capture_lengths(w.capture_samples, w.seed, w.capture_min_len, w.capture_max_len)
    sequences = data.token_sequences(lengths, shape.vocab_size, w.seed)
    model = ctx.model

    def run():
        return capture_last_token(model, sequences, w.capture_batch, max_length=w.capture_max_len)

    cold, seconds, heads = cold_then_warm(run)
    flops = model_flops(shape, lengths, backward=False, lm_head=False)
    profile = ctx.profile("capture", run)
    log.info("capture %s: %d samples in %.2f s (cold %.2f s)", shape.name, len(sequences), seconds, cold)
    return [record("capture", shape.name, seconds, tokens=int(lengths.sum()), samples=len(sequences),
                   model_flops=flops, peak_tflops=ctx.peak_tflops, variant=f"batch{w.capture_batch}",
                   batch_size=w.capture_batch, cold_seconds=cold, activations_shape=list(heads.shape), profile=profile,
                   notes="length-bucketed right-padded batches, bf16, last-token heads only leave the device; "
                         "warm call (cold_seconds: first call with compilation); FLOPs without lm_head")]


if __name__ == "__main__":
    from benchmarks.worker import main

    main(default_stages=("capture",))
