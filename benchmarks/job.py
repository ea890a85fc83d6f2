"""Stage (e): the whole RestoreLCC job's compute, at full size, on a random bf16 model, as the pipeline runs it.

Phases (library calls of `lcc_jax.restore.pipeline`'s stages, on the reference's synthetic data):
  capture_dense   dense model on q, q+r⁺, q+r⁻ of 1,000 probing samples (`capture_last_token`)
  prune           Wanda 50 % with 128 calibration windows of 2,048 tokens (`prune`)
  capture_pruned  pruned model on q
  components      per-head SVD of ΔZ (`lost_components`)
  probes          1,024 contrastive probes, 200 epochs each (`train_probes`)
  train           β and b of the top 25 % of heads, 2,000 samples × 3 epochs at batch 8 (`fit`)
Every phase is timed cold, compilation included, as a first run of the job would be. `seconds` is
the sum of the phases the PyTorch reference times (all but `prune`: it loads a pruned model there);
`seconds_with_prune` adds Wanda. Not run: loading, evaluation, validation loss, checkpoints, export.

  python -m benchmarks.job --shape llama2-7b --out results/job.json
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import jax
import numpy as np

from benchmarks.common import data, model_flops, record
from benchmarks.workload import Context
from lcc_jax import compile_cache
from lcc_jax.baselines.bias_only import apply_compensation
from lcc_jax.pruning.api import PruneConfig, prune
from lcc_jax.restore.capture import capture_last_token
from lcc_jax.restore.compensation import init_compensation, split_trainable
from lcc_jax.restore.components import lost_components
from lcc_jax.restore.probe import train_probes
from lcc_jax.train import TrainConfig, epoch_batches, fit, precompile_fit

log = logging.getLogger("benchmarks")

REFERENCE_PHASES = ("capture_dense", "capture_pruned", "components", "probes", "train")


def bench(ctx: Context) -> list[dict]:
    w, shape = ctx.work, ctx.shape
    phases: dict[str, float] = {}
    compiling: dict[str, dict] = {}  # per phase: XLA compile seconds, cache hits and misses (lcc_jax.compile_cache)
    compile_cache.track()

    @contextmanager
    def phase(name: str):
        before, started = compile_cache.stats(), time.perf_counter()
        yield
        phases[name] = time.perf_counter() - started
        after = compile_cache.stats()
        compiling[name] = {k: round(after[k] - before[k], 3) for k in after}
        log.info("job %s %s: %.1f s (%.1f s compiling; cache %d hits, %d misses)", shape.name, name, phases[name],
                 compiling[name]["compile_seconds"], compiling[name]["hits"], compiling[name]["misses"])

    queries, positives, negatives = data.probing_triples(w.probe_samples, shape.vocab_size, w.seed, w.probe_max_len)
    samples = data.instruction_samples(w.job_train_samples, shape.vocab_size, w.seed + 1, w.job_max_len)
    calibration = data.calibration_tokens(w.job_calibration, w.seqlen, shape.vocab_size, w.seed)
    model = ctx.model
    sequences = [s.ids.astype(np.int32) for s in samples]
    masks = [np.r_[np.zeros(s.prompt_len), np.ones(len(s) - s.prompt_len)].astype(np.float32) for s in samples]
    config = TrainConfig(epochs=w.job_epochs, batch_size=w.train_batch, seed=w.seed, log_every=50)
    batches = epoch_batches(sequences, masks, config, pad_id=0)
    ahead = None
    if w.job_compile_ahead:  # the heads are not known yet, but the shapes of what trains are
        heads = shape.num_layers * shape.num_heads
        placeholder = init_compensation(np.zeros((heads, shape.head_dim, shape.head_dim), np.float32),
                                        np.arange(heads), w.top_k, jax.random.key(w.seed))
        trainable, frozen = split_trainable(placeholder)
        ahead = precompile_fit(model, trainable, apply_compensation, batches, config, constants=frozen)

    def capture(seqs):
        return capture_last_token(model, seqs, w.job_capture_batch, max_length=w.probe_max_len)

    with phase("capture_dense"):
        dense_q, positive, negative = capture(queries), capture(positives), capture(negatives)
    with phase("prune"):
        result = prune(model, calibration, PruneConfig(method="wanda", sparsity="0.5", batch_size=w.prune_batch))
        jax.block_until_ready(result.masks)
        del result
    with phase("capture_pruned"):
        pruned_q = capture(queries)
    with phase("components"):
        components = lost_components(dense_q, pruned_q, k=10)
    with phase("probes"):
        probes = train_probes(pruned_q, components.component, positive, negative)
    with phase("train"):
        comp = init_compensation(components.basis, probes.ranking, w.top_k, jax.random.key(w.seed))
        trainable, frozen = split_trainable(comp)
        trained = fit(model, trainable, apply_compensation, batches, config, constants=frozen)  # waits for `ahead`
        jax.block_until_ready(trained.trainable)

    seconds = sum(phases[p] for p in REFERENCE_PHASES)
    capture_lengths = [len(s) for s in (*queries, *positives, *negatives, *queries)]
    train_lengths = [len(s) for s in sequences] * w.job_epochs
    flops = (model_flops(shape, capture_lengths, backward=False, lm_head=False)
             + model_flops(shape, train_lengths, backward=True))
    return [record("job", shape.name, seconds, model_flops=flops, peak_tflops=ctx.peak_tflops, variant="reference",
                   seconds_with_prune=seconds + phases["prune"], phases=phases, phases_compiling=compiling,
                   compile_cache=str(compile_cache.folder()) if compile_cache.folder() else None,
                   probe_samples=w.probe_samples,
                   train_samples=w.job_train_samples, epochs=w.job_epochs, batch_size=w.train_batch,
                   train_steps=trained.steps, calibration_samples=w.job_calibration,
                   train_compiled_ahead=None if ahead is None else ahead.result(),
                   notes="full size, compilation included (cold unless compile_cache names a warm folder); "
                         "train_compiled_ahead: train-step shapes compiled on a thread while capture and pruning "
                         "ran (their compile seconds count in those phases), 0 where the compile cache already held them (fit reads them "
                         "back in the train phase); "
                         "seconds = capture + components + probes + train as the reference times them; "
                         "seconds_with_prune adds Wanda; no evaluation or validation")]


if __name__ == "__main__":
    from benchmarks.worker import main

    main(default_stages=("job",))
