"""The scripts' side: estimate a job before it runs, warn on a long CPU job, follow it in the bars, report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from lcc_jax import progress
from lcc_jax.config import ModelConfig
from lcc_jax.convert.gguf_source import GGUFSource
from lcc_jax.convert.load import resolve
from lcc_jax.estimate.costs import CHARS_PER_TOKEN, Estimate, Machine
from lcc_jax.estimate.jobs import done_stages, evaluate_estimate, recovery_estimate, restore_estimate
from lcc_jax.estimate.tokens import wikitext2_tokens
from lcc_jax.progress import duration
from lcc_jax.restore import steps
from lcc_jax.restore.config import PRESET_FLAGS
from lcc_jax.restore.job_folder import write_text

log = logging.getLogger("lcc_jax.estimate")  # one logger for the package


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
        machine = Machine.measure(devices=job.mesh.size if job.mesh is not None else 1, dtype=job.dtype)
        estimate = restore_estimate(config, job.restore, job.prune, job.calibration, machine,
                                    samples=steps.samples(job.restore), pruned=job.pruned is not None,
                                    export_hf=job.export_hf, plots=plots,
                                    done=() if restart else done_stages(job.out))
        estimate = calibrated(estimate, job.out)
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
        machine = Machine.measure(devices=mesh.size if mesh is not None else 1, dtype=config.dtype)
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
        estimate = calibrated(estimate, out)
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
        machine = Machine.measure(devices=1, dtype=getattr(args, "dtype", "fp32"))
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


CALIBRATION_MIN_SECONDS = 5.0  # stages estimated below this say little about the model's error
CALIBRATION_RANGE = (0.1, 10.0)  # a measured ratio beyond this is more likely a broken run than the model's error


def stage_kind(name: str) -> str:
    """What a stage's measured time says something about: a recovery cell's method ("wanda:0.5/seed1/lora":
    "lora"), else the stage itself."""
    return name.rsplit("/", 1)[-1]


def calibrated(estimate: Estimate, out: Path | None) -> Estimate:
    """The estimate with its stages scaled by what an earlier process of the same job measured (out/eta.json):
    each stage by the median measured / estimated ratio of that kind's stages, else of all its stages, within
    `CALIBRATION_RANGE`. Unchanged when there is no such file, or it was measured on another kind of machine or
    in another dtype.

    A job resumed in a new process (a stopped run, a job run in phases) would otherwise start again from the
    cost model, which can be several times off on an accelerator (3-7x over for Qwen2.5-1.5B in bf16 on an
    H200); the followed plan corrects only from the stages of its own process.
    """
    try:
        earlier = json.loads((Path(out) / "eta.json").read_text()) if out is not None else None
    except (OSError, ValueError):
        return estimate
    machine = (earlier or {}).get("machine") or {}
    if (machine.get("backend") != estimate.machine.backend or machine.get("devices") != estimate.machine.devices
            or machine.get("dtype", "fp32") != estimate.machine.dtype):  # older files: every rate was fp32's
        return estimate
    ratios: dict[str, list[float]] = {}
    for name, stage in (earlier.get("per_stage") or {}).items():
        if stage.get("predicted", 0) >= CALIBRATION_MIN_SECONDS and stage.get("measured", 0) > 0:
            ratios.setdefault(stage_kind(name), []).append(stage["measured"] / stage["predicted"])
    if not ratios:
        return estimate
    low, high = CALIBRATION_RANGE
    factors = {kind: min(high, max(low, statistics.median(r))) for kind, r in ratios.items()}
    overall = min(high, max(low, statistics.median(r for kind in ratios.values() for r in kind)))
    stages = tuple(dataclasses.replace(s, seconds=s.seconds * factors.get(stage_kind(s.name), overall))
                   for s in estimate.stages)
    log.info("estimate scaled by the times an earlier run of this job measured here (%s): %s", Path(out) / "eta.json",
             ", ".join(f"{kind} x{factor:.2f}" for kind, factor in sorted(factors.items())))
    return dataclasses.replace(estimate, stages=stages)


def _with_earlier_stages(per_stage: dict, out: Path) -> dict:
    """This process's {stage: predicted, measured}, plus the earlier processes' for the stages it found done
    (estimated 0 here), so the file keeps every stage's measurement for the next `calibrated`."""
    try:
        earlier = json.loads((out / "eta.json").read_text()).get("per_stage") or {}
    except (OSError, ValueError, AttributeError):
        return per_stage
    kept = {name: stage for name, stage in earlier.items()
            if stage.get("predicted", 0) > 0 and per_stage.get(name, {}).get("predicted", 0) == 0}
    return {**per_stage, **kept}


def report(estimate: Estimate | None, out: Path | None = None, started: float | None = None,
           stopped: bool = False) -> dict:
    """Stop following; log the estimate against the measured seconds (per stage and in all) and write them to
    out/eta.json. `started`: time.perf_counter() when the estimate was made (default: the plan's start).
    `stopped`: the job was interrupted; the stages that ended are kept (a resumed job calibrates from them) and
    no error is computed (the total measured is not the job's)."""
    plan = progress.following()
    stages = progress.stop_following(stopped)
    if estimate is None or plan is None:
        return {}
    measured = time.perf_counter() - (plan.started if started is None else started)
    predicted = sum(s.seconds for s in estimate.stages)
    error = None if stopped or measured <= 0 else round((predicted - measured) / measured, 3)
    result = {**estimate.to_dict(), "measured_seconds": round(measured, 1), "error": error, "per_stage": stages}
    per_stage = ", ".join(f"{k} {v['predicted']:.0f}/{v['measured']:.0f} s" for k, v in stages.items())
    if stopped:
        result["stopped"] = True
        log.info("estimate check (stopped after %s): per stage (estimated/measured): %s", duration(measured),
                 per_stage or "none ended")
    else:
        log.info("estimate check: %s estimated, %s measured (%+.0f %%); per stage (estimated/measured): %s",
                 duration(predicted), duration(measured), 100 * (predicted - measured) / max(measured, 1e-9), per_stage)
    if out is not None:
        result["per_stage"] = _with_earlier_stages(stages, Path(out))
        write_text(Path(out) / "eta.json", json.dumps(result, indent=2) + "\n")
    return result


@contextlib.contextmanager
def reported_if_stopped(estimate: Estimate | None, out: Path | None = None) -> Iterator[None]:
    """Around a followed job: on Ctrl-C or SIGTERM (`lcc_jax.signals`), report the stages that ended before
    re-raising, so the next process calibrates from them instead of from the first estimate."""
    try:
        yield
    except KeyboardInterrupt:
        report(estimate, out, stopped=True)
        raise
