"""The benchmark stages: each runs one measured piece of work and returns its JSON records.

Every stage resets the device's peak-memory counter on entry, so `peak_mem_gib` is that stage's
peak (the resident model included). Warm-up work, where a stage has any, is outside the clock.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import transformers

from . import data
from .batching import training_batch
from .capture import capture_batched, capture_reference
from .config import BenchConfig, parse_pattern
from .job import JobConfig, run_job
from .layerwise import first_layer_inputs
from .records import record
from .shapes import Shape, model_flops
from .sparsegpt import no_tf32, prune_layer, prune_sparsegpt
from .timing import Stopwatch, mfu, peak_memory
from .train_step import make_compensation, make_optimizer, train_step
from .wanda import prune_wanda

log = logging.getLogger(__name__)
Records = list[dict[str, Any]]


def bench_capture(model: transformers.LlamaForCausalLM, shape: Shape, device: torch.device, cfg: BenchConfig,
                  peak: float | None) -> Records:
    """Last-token capture: one sample at a time (the reference) and right-padded batches."""
    out = []
    for impl, n, batch in (("torch_reference", cfg.capture_samples, 1),
                           ("torch_batched", cfg.capture_batched_samples, cfg.capture_batch)):
        lengths = data.capture_lengths(n, cfg.seed, cfg.capture_min_len, cfg.capture_max_len)
        seqs = data.token_sequences(lengths, shape.vocab_size, cfg.seed)
        run = (lambda s: capture_reference(model, s, device)) if batch == 1 else \
            (lambda s, batch=batch: capture_batched(model, s, device, batch))
        with peak_memory(device) as mem:
            run(seqs[: max(cfg.capture_warmup, 1)] if batch == 1 else seqs[:batch])  # warm-up, untimed
            with Stopwatch(device) as watch:
                acts = run(seqs)
        flops = model_flops(shape, lengths, backward=False, lm_head=False)  # capture needs no logits
        padded = sum(len(seqs[i: i + batch]) * max(lengths[i: i + batch]) for i in range(0, n, batch))
        out.append(record("capture", impl, shape.name, watch.seconds, tokens=int(lengths.sum()), samples=n,
                          model_flops=flops, mfu=mfu(flops, watch.seconds, peak), peak_mem_gib=mem["gib"],
                          variant="one_at_a_time" if batch == 1 else f"batch{batch}", batch_size=batch,
                          padded_tokens=int(padded), activations_shape=list(acts.shape),
                          notes="full causal LM forward as the reference (logits too, not counted in model_flops); "
                                "last-token o_proj inputs of every head"))
        log.info("capture %s: %d samples in %.2f s", impl, n, watch.seconds)
    return out


def bench_train(model: transformers.LlamaForCausalLM, shape: Shape, device: torch.device, cfg: BenchConfig,
                peak: float | None) -> Records:
    """Compensation training steps on right-padded batches of Alpaca-like lengths."""
    total = cfg.train_warmup + cfg.train_steps
    samples = data.training_samples(total * cfg.train_batch, shape.vocab_size, cfg.seed, cfg.train_min_len,
                                    cfg.train_max_len)
    batches = [training_batch(samples[i * cfg.train_batch: (i + 1) * cfg.train_batch]) for i in range(total)]
    compensation = make_compensation(shape, cfg.top_k, device, cfg.seed)
    compensation.attach(model)
    optimizer, scheduler = make_optimizer(compensation, total)
    losses = []
    try:
        with peak_memory(device) as mem, torch.enable_grad():
            for batch in batches[: cfg.train_warmup]:
                train_step(model, compensation, optimizer, scheduler, batch, device)
            with Stopwatch(device) as watch:
                for batch in batches[cfg.train_warmup:]:
                    losses.append(train_step(model, compensation, optimizer, scheduler, batch, device))
    finally:
        compensation.detach_hooks()
    timed = batches[cfg.train_warmup:]
    lengths = [int(n) for b in timed for n in b["attention_mask"].sum(1)]
    flops = model_flops(shape, lengths, backward=True)
    log.info("train: %d steps in %.2f s", cfg.train_steps, watch.seconds)
    return [record("train_step", "torch_reference", shape.name, watch.seconds, tokens=sum(lengths),
                   samples=len(lengths), steps=cfg.train_steps, model_flops=flops,
                   mfu=mfu(flops, watch.seconds, peak), peak_mem_gib=mem["gib"], variant=f"batch{cfg.train_batch}",
                   batch_size=cfg.train_batch, padded_tokens=int(sum(b["input_ids"].numel() for b in timed)),
                   heads=compensation.heads.numel(), trainable_params=2 * compensation.beta.numel(),
                   loss_first=float(losses[0]), loss_last=float(losses[-1]),
                   notes="HF loss on response tokens, backward to beta/b only, clip 1.0, AdamW lr 1e-3 linear decay")]


def _calibration(shape: Shape, cfg: BenchConfig) -> torch.Tensor:
    return torch.from_numpy(data.calibration_tokens(cfg.nsamples, cfg.seqlen, shape.vocab_size, cfg.seed))


def _calibration_extra(cfg: BenchConfig) -> dict[str, Any]:
    return {"nsamples": cfg.nsamples, "seqlen": cfg.seqlen}


def bench_wanda(model: transformers.LlamaForCausalLM, shape: Shape, device: torch.device, cfg: BenchConfig,
                peak: float | None) -> Records:
    """Wanda on the whole model, layer by layer, for each model-level pattern."""
    out = []
    for pattern in cfg.model_patterns:
        n, m = parse_pattern(pattern)
        with peak_memory(device) as mem, Stopwatch(device) as watch:
            prune_wanda(model, _calibration(shape, cfg), device, 0.5, n, m)
        out.append(record("wanda", "torch_reference", shape.name, watch.seconds, tokens=cfg.nsamples * cfg.seqlen,
                          samples=cfg.nsamples, peak_mem_gib=mem["gib"], variant=pattern, **_calibration_extra(cfg),
                          notes="random calibration ids for C4; windows one at a time; tokens/s = calibration tokens"))
        log.info("wanda %s: %.2f s", pattern, watch.seconds)
    return out


def bench_sparsegpt_layer(model: transformers.LlamaForCausalLM, shape: Shape, device: torch.device,
                          cfg: BenchConfig, peak: float | None) -> Records:
    """SparseGPT on one decoder layer's seven linears: Hessians, pruning, re-forward."""
    out = []
    layer = model.model.layers[cfg.sparsegpt_layer]
    for pattern in cfg.layer_patterns:
        n, m = parse_pattern(pattern)
        with peak_memory(device) as mem, no_tf32():
            inps, kwargs = first_layer_inputs(model, _calibration(shape, cfg), device)
            outs = torch.zeros_like(inps)
            with Stopwatch(device) as watch:
                per_linear = prune_layer(layer, inps, outs, kwargs, device, 0.5, n, m)
        del inps, outs
        out.append(record("sparsegpt_layer", "torch_reference", shape.name, watch.seconds,
                          tokens=cfg.nsamples * cfg.seqlen, samples=cfg.nsamples, peak_mem_gib=mem["gib"],
                          variant=pattern, layer=cfg.sparsegpt_layer, fasterprune_seconds=per_linear,
                          hessian_and_forward_seconds=watch.seconds - sum(per_linear.values()),
                          **_calibration_extra(cfg),
                          notes="one layer, inputs caught at the first layer (untimed); blocksize 128, percdamp .01"))
        log.info("sparsegpt layer %s: %.2f s (fasterprune %.2f s)", pattern, watch.seconds, sum(per_linear.values()))
    return out


def bench_sparsegpt_model(model: transformers.LlamaForCausalLM, shape: Shape, device: torch.device,
                          cfg: BenchConfig, peak: float | None) -> Records:
    """SparseGPT on the whole model, layer by layer, for each model-level pattern."""
    out = []
    for pattern in cfg.model_patterns:
        n, m = parse_pattern(pattern)
        with peak_memory(device) as mem, Stopwatch(device) as watch:
            prune_sparsegpt(model, _calibration(shape, cfg), device, 0.5, n, m)
        out.append(record("sparsegpt_model", "torch_reference", shape.name, watch.seconds,
                          tokens=cfg.nsamples * cfg.seqlen, samples=cfg.nsamples, peak_mem_gib=mem["gib"],
                          variant=pattern, **_calibration_extra(cfg),
                          notes="random calibration ids for C4; windows one at a time; blocksize 128, percdamp .01"))
        log.info("sparsegpt model %s: %.2f s", pattern, watch.seconds)
    return out


def bench_job(model: transformers.LlamaForCausalLM, shape: Shape, device: torch.device, cfg: BenchConfig,
              peak: float | None) -> Records:
    """The whole restore job on `cfg.fraction` of its work: the measured record and the extrapolated one."""
    job = JobConfig(probe_samples=cfg.probe_samples, train_samples=cfg.job_train_samples, epochs=cfg.job_epochs,
                    batch_size=cfg.train_batch, top_k=cfg.top_k, max_len=cfg.job_max_len,
                    probe_max_len=cfg.probe_max_len, fraction=cfg.fraction, seed=cfg.seed)
    with peak_memory(device) as mem:
        phases = run_job(model, shape, device, job)
    measured = sum(p.seconds for p in phases.values())
    full = sum(p.extrapolated_seconds() for p in phases.values())
    extra = {"variant": "reference", "fraction": cfg.fraction, "probe_samples": cfg.probe_samples,
             "train_samples": cfg.job_train_samples, "epochs": cfg.job_epochs, "batch_size": cfg.train_batch,
             "phases": {name: p.as_dict() for name, p in phases.items()}}
    untimed = "untimed: model build, pruning (magnitude, in place of loading a pruned checkpoint), evaluation"
    return [record("job", "torch_reference", shape.name, measured, peak_mem_gib=mem["gib"], extrapolated=False,
                   notes=f"measured on fraction {cfg.fraction} of every phase; {untimed}", **extra),
            record("job", "torch_reference", shape.name, full, peak_mem_gib=mem["gib"], extrapolated=True,
                   notes=f"EXTRAPOLATED full job from fraction {cfg.fraction}: per phase first unit + rest "
                         f"scaled to the full count; {untimed}", **extra)]


STAGE_RUNNERS = {
    "capture": bench_capture,
    "train": bench_train,
    "wanda": bench_wanda,
    "sparsegpt_layer": bench_sparsegpt_layer,
    "sparsegpt_model": bench_sparsegpt_model,
    "job": bench_job,
}
ALIASES = {"sparsegpt": ("sparsegpt_layer", "sparsegpt_model"), "train_step": ("train",)}


def expand_stages(names: tuple[str, ...]) -> list[str]:
    """Stage names in run order, with "sparsegpt" meaning both its layer and model runs."""
    out: list[str] = []
    for name in names:
        for stage in ALIASES.get(name, (name,)):
            if stage not in STAGE_RUNNERS:
                raise ValueError(f"unknown stage {stage!r}; known: {', '.join([*STAGE_RUNNERS, *ALIASES])}")
            out.append(stage)
    return out

