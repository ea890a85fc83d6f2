"""Estimates of whole jobs: a restore job, a recovery table, an evaluation."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from lcc_jax.data.negatives import MINILM_PACKAGE
from lcc_jax.data.runner import padded_shapes
from lcc_jax.estimate.costs import CHARS_PER_TOKEN, Costs, Estimate, Machine, StageEstimate
from lcc_jax.estimate.tokens import (
    capture_shapes,
    packed_train_shapes,
    perplexity_shapes,
    text_tokens,
    wikitext2_tokens,
    zeroshot_shapes,
)


def restore_estimate(model_config, restore, prune, calibration, machine: Machine, *, samples: Sequence,
                     pruned: bool = False, export_hf: bool = True, plots: bool = True,
                     done: Iterable[str] = (), minilm: bool | None = None) -> Estimate:
    """The stages of `restore.pipeline.run` (and the script's plots); stages in `done` cost nothing."""
    costs = Costs(model_config, machine)
    r = restore
    prompts = [text_tokens(s.prompt) for s in samples]
    responses = [math.ceil(len(s.response) / CHARS_PER_TOKEN) for s in samples]
    probe = slice(0, r.num_probe)
    q = [min(n, r.capture_length) for n in prompts[probe]]
    qr = [min(p + n, r.capture_length) for p, n in zip(prompts[probe], responses[probe], strict=True)]
    ppl = costs.forward(perplexity_shapes(r.eval_seqlen, r.eval_limit_chunks))
    stages = [("load", costs.load(), 0)]

    if minilm is None:
        minilm = importlib.util.find_spec(MINILM_PACKAGE) is not None
    free = [min(n + 1, 512) for s, n in zip(samples, responses, strict=True) if s.choices is None]
    if not free:
        stages.append(("pairs", 0.1, 0))
    elif minilm and r.negatives != "model":
        stages.append(("pairs", 2.0 + 0.01 * len(free), 0))
    else:
        stages.append(("pairs", *costs.forward(capture_shapes(free, 16), logits=False)))
    stages.append(("eval_dense", *ppl))
    dense = [costs.forward(capture_shapes(x, r.capture_batch_size), logits=False) for x in (q, qr, qr)]
    stages.append(("dense_capture", sum(s for s, _ in dense), sum(t for _, t in dense)))
    if pruned:
        stages.append(("prune", costs.load(), 0))
    else:
        tokens = calibration.nsamples * calibration.seqlen if prune.needs_calibration else 0
        stages.append(("prune", costs.prune(prune.method, tokens, calibration.seqlen), tokens))
    stages.append(("pruned_capture", *costs.forward(capture_shapes(q, r.capture_batch_size), logits=False)))
    heads = model_config.num_layers * model_config.num_heads
    stages.append(("components", 0.5 + heads * r.num_probe * model_config.head_dim ** 2 * 4 / machine.flops, 0))
    probe_flops = 200 * 6 * heads * r.num_probe * 2 * model_config.head_dim
    stages.append(("probes", costs.compile_seconds(2) + probe_flops / machine.flops, 0))
    stages.append(("eval_pruned", *ppl))  # after the probes: the train step compiles meanwhile (pipeline.prepare)
    train_lengths = [min(p + n, r.max_length) for p, n in zip(prompts, responses, strict=True)]
    seconds, tokens = costs.train(packed_train_shapes(train_lengths, r.batch_size, r.epochs), r.remat)
    if r.valid_data not in (None, "", "none"):
        valid = padded_shapes((train_lengths * math.ceil(r.num_valid / max(len(train_lengths), 1)))[: r.num_valid],
                              r.batch_size, range(64, r.max_length + 64, 64))
        v_seconds, v_tokens = costs.forward(valid * r.epochs)
        v_seconds -= costs.compile_seconds(len(set(valid))) * (r.epochs - 1)  # compiled once, not per epoch
        seconds, tokens = seconds + v_seconds, tokens + v_tokens
    stages.append(("train", seconds, tokens))
    stages.append(("fold", 0.5 + costs.params * 4e-9, 0))
    stages.append(("export", costs.save(2 if export_hf else 1), 0))
    stages.append(("eval_restored", *ppl))
    if plots:
        stages.append(("plots", 3.0, 0))
    done = set(done)
    return Estimate("restore job", machine, tuple(StageEstimate(name, 0.0 if name in done else float(seconds),
                                                                0 if name in done else int(tokens))
                                                 for name, seconds, tokens in stages))


def recovery_estimate(model_config, machine: Machine, *, settings: Sequence[tuple[str, object]],
                      methods: Sequence[str], seeds: Sequence[int], restore, calibration, tasks: str | None,
                      limit: int | None, samples: Sequence, zeroshot_batch_size: int = 32,
                      done: Iterable[str] = ()) -> Estimate:
    """scripts/benchmark_recovery.py: the dense cell, each setting's pruning and pruned cell, then every
    (setting, seed, method) cell, named as `benchmark.recovery` announces them; cells in `done` cost nothing.
    `settings`: (name, PruneConfig) pairs."""
    costs = Costs(model_config, machine)
    r = restore
    ppl = costs.forward(perplexity_shapes(r.eval_seqlen, r.eval_limit_chunks))
    zs = zeroshot_shapes(tasks, limit, zeroshot_batch_size) or []
    score = ppl[0] + (costs.forward(zs)[0] if zs else 0.0)
    job = restore_estimate(model_config, r, settings[0][1] if settings else None, calibration, machine,
                           samples=samples, pruned=True, export_hf=False, plots=False, minilm=None)
    part = {s.name: s.seconds for s in job.stages}
    train = part["train"]
    first = sum(part[n] for n in ("pairs", "dense_capture"))  # shared by the later seeds' RestoreLCC jobs
    job_rest = sum(part[n] for n in ("load", "prune", "pruned_capture", "components", "probes", "fold",
                                     "eval_restored"))
    per_method = {"lora": train * 1.2, "dora": train * 1.5, "masked_lora": train * 1.3, "lofit": train * 2.0}
    stages = [StageEstimate("dense", costs.load() + score)]
    for name, prune in settings:
        tokens = calibration.nsamples * calibration.seqlen if prune.needs_calibration else 0
        stages.append(StageEstimate(f"{name} prune", costs.load() + costs.prune(prune.method, tokens,
                                                                                 calibration.seqlen) + score))
        for k, seed in enumerate(seeds):
            for method in methods:
                if method in per_method:
                    seconds = costs.load() + per_method[method] + score
                else:  # RestoreLCC's whole job on the pruned checkpoint
                    seconds = job_rest + train + (first if k == 0 else 0.0) + score
                stages.append(StageEstimate(f"{name}/seed{seed}/{method}", seconds))
    done = set(done)
    return Estimate("recovery benchmark", machine,
                    tuple(dataclasses.replace(s, seconds=0.0) if s.name in done else s for s in stages))


# The files `restore.pipeline` writes when a stage is done (its next run skips the stage).
STAGE_FILES = {"pairs": "pairs.jsonl", "eval_dense": "eval_dense.json", "dense_capture": "dense_capture",
               "prune": "pruned", "eval_pruned": "eval_pruned.json", "pruned_capture": "pruned_capture.npy",
               "components": "components.npz", "probes": "probes.npz", "train": "compensation.npz",
               "fold": "restored", "export": "restored_hf", "eval_restored": "eval_restored.json"}


def done_stages(out) -> list[str]:
    """The stages whose results are already in the job folder `out`."""
    out = Path(out)
    return [name for name, file in STAGE_FILES.items() if (out / file).exists()]


def evaluate_estimate(model_config, machine: Machine, *, seqlen: int | None, limit_chunks: int | None,
                      batch_size: int | None, tasks: str | None, limit: int | None, max_length: int = 2048,
                      zeroshot_batch_size: int = 16, data_tokens: int | None = None) -> Estimate:
    """scripts/evaluate.py: load, perplexity (`seqlen` None: none), zero-shot (`tasks` None: none)."""
    costs = Costs(model_config, machine)
    stages = [StageEstimate("load", costs.load())]
    if seqlen:
        batch = batch_size or 1
        chunks = (data_tokens if data_tokens is not None else wikitext2_tokens()) // seqlen
        chunks = min(chunks, limit_chunks) if limit_chunks else chunks
        stages.append(StageEstimate("perplexity", *costs.forward([(batch, seqlen)] * math.ceil(chunks / batch))))
    if tasks:
        shapes = zeroshot_shapes(tasks, limit, zeroshot_batch_size, max_length)
        if shapes is not None:
            stages.append(StageEstimate("zero-shot", *costs.forward(shapes)))
    return Estimate("evaluation", machine, tuple(stages))
