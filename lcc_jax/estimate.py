"""What a job will cost before it starts: tokens per stage, seconds on this machine, and a warning on a CPU.

    machine = Machine.measure()                                  # a short matmul: this device's FLOP/s
    plan = restore_estimate(model_config, restore, prune, calibration, machine, samples=samples)
    plan.log()                                                   # one line per stage, and the total
    plan.warn_if_long(QUICK_HINT)                                # on a CPU, above 15 minutes
    progress.follow(plan.stages_seconds())                       # bars and stage lines show time left

A stage's seconds = its FLOPs / (the measured matmul rate x an efficiency for that kind of work) + the
compile seconds of its programs. FLOPs come from the model's shapes (2 per weight per token, plus
attention over the context) and the tokens the stage runs: counted from the data's characters
(`CHARS_PER_TOKEN`) and padded the way the stage batches them. The efficiencies and compile times were
fitted to measured SmolLM2-135M runs on a 2-core CPU (README, "On a CPU"); on an accelerator they are
rougher, and the progress bars correct the rest from each stage's measured step time
(`lcc_jax.progress.Plan`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lcc_jax import progress
from lcc_jax.config import ModelConfig
from lcc_jax.convert.gguf_source import GGUFSource
from lcc_jax.convert.load import resolve
from lcc_jax.data.negatives import MINILM_PACKAGE
from lcc_jax.data.runner import choose_buckets, padded_shapes
from lcc_jax.data.text import data_dir
from lcc_jax.eval.tasks import load_docs, resolve_tasks
from lcc_jax.progress import duration
from lcc_jax.restore import steps
from lcc_jax.restore.capture import capture_buckets
from lcc_jax.restore.config import PRESET_FLAGS
from lcc_jax.restore.job_folder import write_text

log = logging.getLogger(__name__)

CPU_WARN_SECONDS = 15 * 60  # a CPU job estimated above this gets a warning naming the quick flags
CHARS_PER_TOKEN = 4.3  # English text with a Llama / SmolLM2 / Qwen BPE: 4.2 (WikiText-2) to 4.7 (Alpaca answers)
WIKITEXT2_TEST_CHARS = 1_285_622  # wiki.test.raw, when the file itself is not at hand (the hub)

# Fraction of the measured matmul rate each kind of work reaches, and compile seconds per program shape.
EFFICIENCY = {
    "cpu": {"forward": 0.8, "train": 0.65, "prune": 0.4},
    "gpu": {"forward": 0.35, "train": 0.25, "prune": 0.1},
    "tpu": {"forward": 0.35, "train": 0.25, "prune": 0.1},
}
COMPILE_SECONDS = {"cpu": 1.0, "gpu": 2.0, "tpu": 4.0}  # one forward program; a train step costs TRAIN_COMPILE x
TRAIN_COMPILE = 6.0
TRAIN_FLOPS = 2.5  # a train step / a forward pass: backward to the activations (weights frozen) + attention
REMAT_FLOPS = 1.0  # with remat each layer's forward runs again in the backward pass
LOAD_BYTES_PER_SECOND = 1.5e8  # read, convert, place (safetensors on a local disk)
SAVE_BYTES_PER_SECOND = 2.5e8  # Orbax or safetensors, written once


@dataclasses.dataclass(frozen=True)
class Machine:
    """Where the job runs: backend, devices, cores, and the fp32 matmul rate measured on them."""

    backend: str
    devices: int
    cores: int
    flops: float  # FLOP/s of a model-sized fp32 matmul, all devices together

    @classmethod
    def measure(cls, devices: int | None = None, seconds: float = 0.3) -> Machine:
        """Time a (512 x 1024) @ (1024 x 2048) matmul on the default device for `seconds` (the median run: a
        moment of load from other programs moves it little); an accelerator's rate is multiplied by `devices`
        (default: all), a CPU's is not (its devices share the same cores). Measured once per process."""
        count = jax.device_count() if devices is None else devices
        backend, rate = _matmul_rate(seconds)
        return cls(backend, count, _cores(), rate * (count if backend != "cpu" else 1))

    def describe(self) -> str:
        where = f"{self.cores} CPU cores" if self.backend == "cpu" else f"{self.devices} {self.backend.upper()}(s)"
        return f"{where}, {self.flops / 1e9:.0f} GFLOP/s measured"


@functools.cache
def _matmul_rate(seconds: float) -> tuple[str, float]:
    """(backend, FLOP/s) of the default device: the median of timed fp32 matmuls."""
    backend = jax.default_backend()
    n, k, m = (512, 1024, 2048) if backend == "cpu" else (4096, 4096, 4096)
    a, b = jnp.ones((n, k), jnp.float32), jnp.ones((k, m), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    times, start = [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return backend, 2.0 * n * k * m / float(np.median(times))


@dataclasses.dataclass(frozen=True)
class StageEstimate:
    name: str
    seconds: float
    tokens: int = 0  # tokens the stage runs through the model (0: no model work)
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Estimate:
    """The stages of one job, in order, with their estimated seconds."""

    job: str
    machine: Machine
    stages: tuple[StageEstimate, ...]

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def stages_seconds(self) -> list[tuple[str, float]]:
        return [(s.name, s.seconds) for s in self.stages]

    def log(self, logger: logging.Logger | None = None) -> None:
        """One line: the machine, the total, every stage."""
        logger = logger or log
        parts = ", ".join(f"{s.name} {duration(s.seconds)}" for s in self.stages if s.seconds >= 0.5)
        tokens = sum(s.tokens for s in self.stages)
        logger.info("estimate for %s on %s: about %s in all (%s tokens through the model): %s", self.job,
                    self.machine.describe(), duration(self.seconds), f"{tokens:,}", parts)

    def warn_if_long(self, hint: str, logger: logging.Logger | None = None, limit: float = CPU_WARN_SECONDS) -> bool:
        """On a CPU, warn when the estimate exceeds `limit` seconds, naming what makes a small run (`hint`)."""
        logger = logger or log
        if self.machine.backend != "cpu" or self.seconds <= limit:
            return False
        top = sorted(self.stages, key=lambda s: -s.seconds)[:3]
        logger.warning("this %s is estimated at about %s on this CPU (%d cores; mostly %s). For a faithful small "
                       "run of the whole pipeline in a few minutes use %s; on a GPU or TPU the full run is much "
                       "faster.", self.job, duration(self.seconds), self.machine.cores,
                       ", ".join(f"{s.name} {duration(s.seconds)}" for s in top), hint)
        return True

    def to_dict(self) -> dict:
        return {"job": self.job, "machine": dataclasses.asdict(self.machine), "seconds": round(self.seconds, 1),
                "stages": {s.name: round(s.seconds, 1) for s in self.stages}}


# ------------------------------------------------------------------------------------------ costs


@dataclasses.dataclass(frozen=True)
class Costs:
    """FLOPs per token of one model on one machine, and seconds for the kinds of work the stages do."""

    config: object  # lcc_jax.config.ModelConfig
    machine: Machine

    @property
    def params(self) -> int:
        c = self.config
        attention = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)  # q, o; k, v
        layer = attention + 3 * c.hidden_size * c.intermediate_size
        embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
        return c.num_layers * layer + embed

    def flops_per_token(self, context: int, logits: bool = True) -> float:
        """Forward FLOPs of one token: 2 per weight, attention over half the context (causal), the lm_head."""
        c = self.config
        weights = self.params - c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
        attention = c.num_layers * 2 * c.num_heads * c.head_dim * context  # QK^T and AV, 2 FLOPs each, context/2 keys
        return 2.0 * weights + attention + (2.0 * c.vocab_size * c.hidden_size if logits else 0.0)

    def _rate(self, kind: str) -> float:
        return self.machine.flops * EFFICIENCY.get(self.machine.backend, EFFICIENCY["gpu"])[kind]

    def compile_seconds(self, programs: int, train: bool = False) -> float:
        per = COMPILE_SECONDS.get(self.machine.backend, 2.0) * (TRAIN_COMPILE if train else 1.0)
        return per * programs

    def forward(self, shapes: Iterable[tuple[int, int]], logits: bool = True) -> tuple[float, int]:
        """(seconds, tokens) of forward passes over padded (batch, length) shapes, compiles included."""
        shapes = list(shapes)
        flops = sum(b * n * self.flops_per_token(n, logits) for b, n in shapes)
        tokens = sum(b * n for b, n in shapes)
        return flops / self._rate("forward") + self.compile_seconds(len(set(shapes))), tokens

    def train(self, shapes: Iterable[tuple[int, int]], remat: bool = False, max_programs: int = 6) -> tuple[float, int]:
        """(seconds, tokens) of train steps (`fit` compiles at most six packed shapes)."""
        shapes = list(shapes)
        flops = (TRAIN_FLOPS + (REMAT_FLOPS if remat else 0.0)) * sum(b * n * self.flops_per_token(n) for b, n in shapes)
        tokens = sum(b * n for b, n in shapes)
        programs = min(len(set(shapes)), max_programs)
        return flops / self._rate("train") + self.compile_seconds(programs, train=True), tokens

    def prune(self, method: str, tokens: int, seqlen: int) -> float:
        """Sequential layer-by-layer calibration (each layer's inputs, then its pruned outputs) and the masks."""
        if method == "magnitude":
            return 1.0 + self.params * 2e-8
        passes = 3.0 if method == "sparsegpt" else 2.0
        flops = passes * tokens * self.flops_per_token(seqlen, logits=False)
        return flops / self._rate("prune") + self.compile_seconds(4) + self.params * 5e-8

    def load(self, bytes_per_param: int = 4) -> float:
        return 1.0 + self.params * bytes_per_param / LOAD_BYTES_PER_SECOND

    def save(self, copies: int = 1, bytes_per_param: int = 4) -> float:
        return 0.5 + copies * self.params * bytes_per_param / SAVE_BYTES_PER_SECOND


# ------------------------------------------------------------------------------------------ tokens


def text_tokens(text: str) -> int:
    """Tokens of a text, from its characters (+1 for a BOS)."""
    return 1 + math.ceil(len(text) / CHARS_PER_TOKEN)


def capture_shapes(lengths: Sequence[int], batch: int) -> list[tuple[int, int]]:
    return padded_shapes(lengths, batch, capture_buckets(lengths, batch))


def packed_train_shapes(lengths: Sequence[int], batch: int, epochs: int, multiple: int = 128) -> list[tuple[int, int]]:
    """One packed row per micro-batch (`pack_batch`): its samples' tokens, rounded up to `multiple`."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(epochs):
        order = rng.permutation(len(lengths))
        for start in range(0, len(order), batch):
            total = int(sum(lengths[i] for i in order[start : start + batch]))
            out.append((1, -(-total // multiple) * multiple))
    return out


def wikitext2_tokens() -> int:
    """Tokens of the WikiText-2 test text (from the local file's size when present)."""
    root = data_dir()
    path = root / "wikitext-2-raw" / "wiki.test.raw" if root is not None else None
    chars = path.stat().st_size if path is not None and path.is_file() else WIKITEXT2_TEST_CHARS
    return int(chars / CHARS_PER_TOKEN)


def perplexity_shapes(seqlen: int, limit_chunks: int | None, batch: int = 1) -> list[tuple[int, int]]:
    chunks = wikitext2_tokens() // seqlen
    chunks = min(chunks, limit_chunks) if limit_chunks else chunks
    return [(batch, seqlen)] * math.ceil(chunks / batch)


def zeroshot_shapes(tasks: str | None, limit: int | None, batch: int = 16,
                    max_length: int = 2048) -> list[tuple[int, int]] | None:
    """Padded shapes of the zero-shot requests (one per choice), or None when the documents cannot be read."""
    if not tasks:
        return []
    quiet = logging.getLogger("lcc_jax.eval.tasks")
    level, quiet.level = quiet.level, logging.WARNING
    try:
        lengths = [min(max_length, text_tokens(ctx + cont)) for name in resolve_tasks(tasks)
                   for doc in load_docs(name, limit=limit) for ctx, cont in doc.requests]
    except Exception as e:  # noqa: BLE001 - no local file and no hub: the estimate leaves zero-shot out
        log.debug("zero-shot not estimated: %s", e)
        return None
    finally:
        quiet.level = level
    return padded_shapes(lengths, batch, choose_buckets(lengths, batch)) if lengths else []


# ------------------------------------------------------------------------------------------ jobs


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
    stages.append(("eval_pruned", *ppl))
    stages.append(("pruned_capture", *costs.forward(capture_shapes(q, r.capture_batch_size), logits=False)))
    heads = model_config.num_layers * model_config.num_heads
    stages.append(("components", 0.5 + heads * r.num_probe * model_config.head_dim ** 2 * 4 / machine.flops, 0))
    probe_flops = 200 * 6 * heads * r.num_probe * 2 * model_config.head_dim
    stages.append(("probes", costs.compile_seconds(2) + probe_flops / machine.flops, 0))
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


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------ the scripts' side


def quick_flags(names: Iterable[str] | None = None) -> str:
    """'--preset quick (--num-train 64 --num-probe 48 ...)': the quick preset and the flags it sets (`names`:
    only those flags, e.g. the ones a script has)."""
    values = {k: v for k, v in PRESET_FLAGS["quick"].items() if names is None or k in set(names)}
    flags = [(f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k} {v}"
             for k, v in ((k.replace("_", "-"), v) for k, v in values.items())]
    return "--preset quick (" + " ".join(flags) + ")"


def source_config(source):
    """The ModelConfig of a model source without loading its weights (a built-in or hub model is fetched as
    `load` would fetch it)."""
    kind, path = resolve(source)
    if kind == "gguf":
        return ModelConfig.from_hf(GGUFSource(path).hf_config())
    return ModelConfig.from_file(path / "config.json")


def follow_restore_job(job, *, plots: bool = True, restart: bool = False, hint: str | None = None) -> Estimate | None:
    """Estimate a `restore.pipeline.Job` before it runs: log it, warn on a CPU when it is long (naming `hint`,
    default the quick preset's flags), and follow it in the progress bars. None when it cannot be estimated
    (the job then reports its own errors)."""
    try:
        config = source_config(job.model)
        machine = Machine.measure(devices=job.mesh.size if job.mesh is not None else 1)
        estimate = restore_estimate(config, job.restore, job.prune, job.calibration, machine,
                                    samples=steps.samples(job.restore), pruned=job.pruned is not None,
                                    export_hf=job.export_hf, plots=plots,
                                    done=() if restart else done_stages(job.out))
    except Exception as e:  # noqa: BLE001 - an estimate never stops a job; its own checks say what is wrong
        log.info("no estimate of the job's time (%s: %s)", type(e).__name__, e)
        return None
    estimate.log()
    estimate.warn_if_long(hint or quick_flags([f.name for f in dataclasses.fields(job.restore)] + ["nsamples", "seqlen"]))
    progress.follow(estimate.stages_seconds(), bars={"dense_capture": 3})
    return estimate


def follow_recovery(source, out, config, *, prune_configs: dict, slug: Callable[[str], str],
                    mesh=None) -> Estimate | None:
    """Estimate a recovery benchmark (`config`: a benchmark.config.RecoveryConfig; `prune_configs`: each
    setting's PruneConfig; `slug`: a setting's folder name) before it runs: log it, warn on a CPU when it is
    long, and follow its cells in the progress bars. None when it cannot be estimated."""
    try:
        model_config = source_config(source)
        machine = Machine.measure(devices=mesh.size if mesh is not None else 1)
        out = Path(out)
        done = ["dense"] if (out / "dense.json").exists() else []
        for setting in config.settings:
            folder = out / slug(setting)
            done += [f"{setting} prune"] if (folder / "pruned.json").exists() else []
            done += [f"{setting}/seed{seed}/{method}" for seed in config.seeds for method in config.methods
                     if (folder / f"seed{seed}" / f"{method}.json").exists()]
        estimate = recovery_estimate(model_config, machine, settings=[(s, prune_configs[s]) for s in config.settings],
                                     methods=config.methods, seeds=config.seeds, restore=config.restore,
                                     calibration=config.calibration, tasks=config.tasks, limit=config.limit,
                                     samples=steps.samples(config.restore),
                                     zeroshot_batch_size=config.zeroshot_batch_size, done=done)
    except Exception as e:  # noqa: BLE001 - an estimate never stops a job
        log.info("no estimate of the benchmark's time (%s: %s)", type(e).__name__, e)
        return None
    estimate.log()
    estimate.warn_if_long(quick_flags(["num_train", "num_probe", "num_valid", "max_length", "capture_length",
                                       "epochs", "eval_seqlen", "eval_limit_chunks", "remat", "nsamples", "seqlen",
                                       "limit", "seeds", "settings"]))
    progress.follow(estimate.stages_seconds(), bars={s.name: 0 for s in estimate.stages})  # cells: many bars each
    return estimate


def follow_evaluation(args) -> Estimate | None:
    """Estimate scripts/evaluate.py's run from its flags (`args`): log it, warn on a CPU when it is long, and
    follow it (stages "load", "perplexity", "zero-shot"). None when it cannot be estimated."""
    try:
        model_config = source_config(args.model)
        machine = Machine.measure(devices=1)
        perplexity = args.tasks is None or args.ppl
        data = str(args.data)
        tokens = (wikitext2_tokens() if data == "wikitext2" and args.split == "test"
                  else int(Path(data).stat().st_size / CHARS_PER_TOKEN) if Path(data).is_file() else None)
        if perplexity and tokens is None and not args.limit_chunks:
            raise ValueError(f"the size of {data!r} is not known before reading it")
        estimate = evaluate_estimate(model_config, machine, seqlen=args.seqlen if perplexity else None,
                                     limit_chunks=args.limit_chunks, batch_size=args.batch_size, tasks=args.tasks,
                                     limit=args.limit, max_length=args.max_length,
                                     zeroshot_batch_size=args.batch_size or 16,
                                     data_tokens=tokens if tokens is not None else args.limit_chunks * args.seqlen)
    except Exception as e:  # noqa: BLE001 - an estimate never stops a job
        log.info("no estimate of the evaluation's time (%s: %s)", type(e).__name__, e)
        return None
    estimate.log()
    estimate.warn_if_long("--limit-chunks 8 --seqlen 512 for the perplexity and --limit 50 for the zero-shot tasks")
    progress.follow(estimate.stages_seconds())
    return estimate


def report(estimate: Estimate | None, out: Path | None = None, started: float | None = None) -> dict:
    """Stop following; log the estimate against the measured seconds (per stage and in all) and write them to
    out/eta.json. `started`: time.perf_counter() when the estimate was made (default: the plan's start)."""
    plan = progress.following()
    stages = progress.stop_following()
    if estimate is None or plan is None:
        return {}
    measured = time.perf_counter() - (plan.started if started is None else started)
    predicted = sum(s.seconds for s in estimate.stages)
    result = {**estimate.to_dict(), "measured_seconds": round(measured, 1),
              "error": round((predicted - measured) / measured, 3) if measured > 0 else None, "per_stage": stages}
    log.info("estimate check: %s estimated, %s measured (%+.0f %%); per stage (estimated/measured): %s",
             duration(predicted), duration(measured), 100 * (predicted - measured) / max(measured, 1e-9),
             ", ".join(f"{k} {v['predicted']:.0f}/{v['measured']:.0f} s" for k, v in stages.items()))
    if out is not None:
        write_text(Path(out) / "eta.json", json.dumps(result, indent=2) + "\n")
    return result
