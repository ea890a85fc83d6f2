"""Stage (b): compensation training steps (forward + backward to the o_proj inputs, AdamW on β and b).

The real trainer (`lcc_jax.train.fit`) on the reference's training batches: batch 8 of
lengths uniform in [120, 500], loss on response tokens, the top 25 % of heads compensated with a random
orthonormal basis. A first `fit` compiles every batch shape and trains (`cold_seconds`); the record is
a second, identical `fit` (all executables cached), timed end to end on the host, so it includes the
trainer's own work (packing, prefetch, metrics). FLOPs: 4·(matmul params)·real tokens + 3·attention.
`attention_check` compares the attention paths on a two-layer model (benchmarks.attention_check).

  python -m benchmarks.train_step --shape llama2-7b --out results/train.json
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from benchmarks.attention_check import attention_check
from benchmarks.common import cold_then_warm, data, model_flops, record
from benchmarks.workload import Context
from lcc_jax.baselines.bias_only import apply_compensation
from lcc_jax.data.batching import make_batches, pack_multiple_for, packed_fill
from lcc_jax.restore.compensation import init_compensation, split_trainable
from lcc_jax.train import TrainConfig, fit

log = logging.getLogger("benchmarks")


def random_compensation(ctx: Context, seed: int):
    """(trainable, frozen) of a compensation on random heads with random orthonormal bases."""
    shape = ctx.shape
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(shape.total_heads, shape.head_dim, shape.head_dim)))[0]
    ranking = rng.permutation(shape.total_heads)
    comp = init_compensation(basis.transpose(0, 2, 1).astype(np.float32), ranking, ctx.work.top_k,
                             jax.random.key(seed))
    return split_trainable(comp)


def bench(ctx: Context) -> list[dict]:
    w, shape = ctx.work, ctx.shape
    pack = w.train_pack
    samples = data.training_samples(w.train_steps * w.train_batch, shape.vocab_size, w.seed, w.train_min_len,
                                    w.train_max_len)
    sequences = [s.ids.astype(np.int32) for s in samples]
    loss_masks = [np.r_[np.zeros(s.prompt_len), np.ones(len(s) - s.prompt_len)].astype(np.float32) for s in samples]
    batches = make_batches(sequences, w.train_batch, pad_id=0, loss_masks=loss_masks, order="given")
    trainable, frozen = random_compensation(ctx, w.seed)
    config = TrainConfig(epochs=1, batch_size=w.train_batch, log_every=max(1, w.train_steps // 3), seed=w.seed)
    model = ctx.model

    def run(max_steps=None):
        result = fit(model, trainable, apply_compensation, lambda epoch: batches, config, constants=frozen,
                     pack=pack, max_steps=max_steps)
        jax.block_until_ready(result.trainable)
        return result

    cold, seconds, result = cold_then_warm(run)
    lengths = [len(s) for s in sequences]
    flops = model_flops(shape, lengths, backward=True)
    padded = sum(b.tokens.size for b in batches)
    fills = [packed_fill(b) for b in batches]
    multiple = pack_multiple_for(fills)
    computed = sum(-(-f // multiple) * multiple for f in fills) if pack else padded
    profile = ctx.profile("train_step", lambda: run(max_steps=min(5, w.train_steps)).trainable)
    check = None
    if w.attention_check:
        check = attention_check(shape, w.train_batch, w.seed, w.train_min_len, w.train_max_len)
        log.info("attention paths against XLA on padded rows (relative error): %s", check)
    log.info("train_step %s: %d steps in %.2f s (cold %.2f s)", shape.name, result.steps, seconds, cold)
    return [record("train_step", shape.name, seconds, tokens=sum(lengths), samples=len(lengths), steps=result.steps,
                   model_flops=flops, peak_tflops=ctx.peak_tflops,
                   variant=f"batch{w.train_batch}" + ("" if pack else "_padded"),
                   batch_size=w.train_batch, packed=pack, cold_seconds=cold, padded_tokens_unpacked=int(padded),
                   computed_tokens=int(computed), pack_multiple=multiple if pack else None,
                   profile=profile, attention_check=check,
                   trainable_params=int(sum(np.prod(v.shape) for v in trainable.values())),
                   loss_first=result.history["loss"][0], loss_last=result.history["loss"][-1],
                   notes=("samples packed into one row per step" if pack else "right-padded 64-multiple buckets")
                   + "; bf16 compute, fp32 AdamW state; warm fit (cold_seconds: first fit with compilation)")]


if __name__ == "__main__":
    from benchmarks.worker import main

    main(default_stages=("train_step",))
