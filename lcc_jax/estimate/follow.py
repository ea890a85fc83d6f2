"""The scripts' side: estimate a job before it runs, warn on a long CPU job, follow it in the bars, report."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable
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
