"""The whole RestoreLCC job, stage by stage into one output folder, resumable.

    load -> dense eval -> pairs -> dense capture -> prune (or load pruned) -> pruned capture
         -> components -> probes -> train -> fold -> restored eval -> export

Each stage runs one in-memory step of `restore.steps` (the functions `lcc_jax.restore` calls in order)
and writes its result atomically into `out/`; it is skipped when that result exists, so an
interrupted run (Ctrl-C, SIGTERM, a crash) resumes where it stopped, and a finished stage is never
overwritten. Dense activations are collected before the model is pruned in place, so the dense and
the pruned weights never live on the device together. `out/run.json` pins the configuration: a
different one against the same folder is refused unless `restart=True` (see `job_folder`).

Several JAX processes (a TPU pod slice, GPU hosts) run the same job: every process builds the same
host batches, the mesh spans all their devices, results come back to every process, and process 0
alone writes files (Orbax checkpoints: each process its own shards).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lcc_jax.checkpoint import META_FILE, load_pruned, save_prune_result
from lcc_jax.convert.export import save_hf, save_orbax
from lcc_jax.convert.load import SourceError, check_source, load
from lcc_jax.data.calibration import CalibrationConfig
from lcc_jax.data.negatives import ContrastivePair
from lcc_jax.distributed import gather_to_host, multi_process
from lcc_jax.eval.perplexity import perplexity_of_tokens, wikitext2_test_ids
from lcc_jax.pruning.api import PruneConfig, prune
from lcc_jax.pruning.masks import masks_from_zeros
from lcc_jax.restore import steps
from lcc_jax.restore.capture import CaptureSet
from lcc_jax.restore.compensation import merge_trainable, num_trainable, split_trainable
from lcc_jax.restore.components import LostComponents
from lcc_jax.restore.config import RestoreConfig
from lcc_jax.restore.job_folder import RUN_FILE, RestoreError, claim, save_file, save_folder, stage, write_text
from lcc_jax.restore.probe import ProbeResult
from lcc_jax.sharding import batch_shards, make_mesh
from lcc_jax.signals import graceful

__all__ = ["RUN_FILE", "Job", "Prepared", "RestoreError", "prepare", "run"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Job:
    """The configuration of one run and where its stages live."""

    model: str
    out: Path
    restore: RestoreConfig
    prune: PruneConfig
    calibration: CalibrationConfig
    pruned: str | None = None  # a pruned checkpoint (scripts/prune.py output) instead of pruning here
    dtype: str = "fp32"
    mesh: Mesh | None = None
    export_hf: bool = True
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    # models already in memory (the recovery benchmark loads each once), used instead of loading their source:
    # {model: (dense model, tokenizer), pruned: PrunedCheckpoint}. Not part of the fingerprint; the job may
    # prune the dense model in place (without `pruned`), so hand it a copy.
    preloaded: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def path(self, name: str) -> Path:
        return self.out / name

    def done(self, name: str) -> bool:
        return self.path(name).exists()

    def fingerprint(self) -> dict[str, Any]:
        """What the results depend on (not the mesh: a run may resume on another topology)."""
        return {
            "model": self.model,
            "pruned": self.pruned,
            "dtype": self.dtype,
            "restore": dataclasses.asdict(self.restore),
            "prune": None if self.pruned else dataclasses.asdict(self.prune),
            "calibration": None if self.pruned or not self.prune.needs_calibration else dataclasses.asdict(self.calibration),
        }


def run(job: Job, *, restart: bool = False) -> dict[str, Any]:
    """Run (or resume) every stage; returns the summary also written to out/summary.json.

    SIGINT / SIGTERM stop it cleanly (`signals.Interrupted`): finished stages stay, the current one
    leaves nothing behind, and the same call resumes. With several JAX processes every process runs
    this with the same job; --out must be on storage all of them see.
    """
    with graceful():
        _check_job(job)
        _check_sources(job)
        claim(job.out, job.fingerprint(), restart)
        try:
            return _run_stages(job)
        except KeyboardInterrupt:
            log.warning("stopped; the finished stages stay in %s, and the same command resumes from them", job.out)
            raise


@dataclasses.dataclass
class Prepared:
    """Everything RestoreLCC knows before training: the pruned model and what probing found."""

    model: Any  # the pruned model (the dense weights are gone)
    tokenizer: Any
    masks: Any
    train_data: Any  # train.data.TrainingData, or None when the compensation is already trained
    components: Any  # restore.components.LostComponents
    probes: Any  # restore.probe.ProbeResult


def prepare(job: Job, *, compile_train: bool = False) -> Prepared:
    """Run (or resume) the stages up to the probes: load, pairs, dense eval and capture, prune, pruned capture,
    components, probes, pruned eval. The ablation study starts here with its own training grid.

    `compile_train`: once the probes have chosen the heads (the train step depends on the lowest one, where
    its backward pass stops), compile the train step on a thread while the pruned model is evaluated.
    """
    dtype = jnp.bfloat16 if job.dtype == "bf16" else jnp.float32
    with stage(job, "load"):
        if job.model in job.preloaded:
            model, tokenizer = job.preloaded.pop(job.model)  # dropped with `model` once pruned
        else:
            model, tokenizer, _ = load(job.model, dtype=dtype, mesh=job.mesh)
    steps.check_top_k(job.restore, model.config, job.model)
    samples = steps.samples(job.restore)
    train_data = None if job.done("compensation.npz") else steps.training_data(job.restore, tokenizer, samples)
    pairs = _stage_pairs(job, samples, model, tokenizer)
    _stage_eval(job, "eval_dense.json", model, tokenizer)
    dense = _stage_dense_capture(job, model, tokenizer, pairs)
    pruned_model, masks, head_map = _stage_prune(job, model, tokenizer, dtype)
    del model  # pruned in place (unstructured) or replaced (structured): the dense weights are gone
    captures = _stage_pruned_capture(job, pruned_model, tokenizer, pairs, dense, head_map)
    components = _stage_components(job, captures)
    probes = _stage_probes(job, captures, components)
    if compile_train and train_data is not None:
        untrained = steps.init(job.restore, components, probes, pruned_model.config.num_layers)
        steps.precompile_train(job.restore, pruned_model, train_data, untrained,
                               mesh=job.mesh)  # `fit` waits for what is still compiling
    _stage_eval(job, "eval_pruned.json", pruned_model, tokenizer)
    return Prepared(pruned_model, tokenizer, masks, train_data, components, probes)


def _run_stages(job: Job) -> dict[str, Any]:
    p = prepare(job, compile_train=True)
    comp = _stage_train(job, p.model, p.tokenizer, p.train_data, p.components, p.probes)
    restored = _stage_fold(job, p.model, p.tokenizer, comp, p.masks)
    _stage_eval(job, "eval_restored.json", restored, p.tokenizer)
    return _summary(job, comp)


# ----------------------------------------------------------------------------------- checks


def _check_job(job: Job) -> None:
    """Refuse, before anything slow, batch sizes the mesh cannot split; give several processes a mesh."""
    if job.mesh is None and multi_process():
        job.mesh = make_mesh()
        log.info("%d processes and no mesh: using all %d devices on the fsdp axis", jax.process_count(),
                 jax.device_count())
    if job.mesh is None:
        return
    shards = batch_shards(job.mesh)
    where = f"the mesh's {shards} batch shards (data x fsdp of {dict(job.mesh.shape)})"
    r = job.restore
    if r.batch_size % shards:
        raise RestoreError(
            f"--batch-size {r.batch_size} does not split over {where}; use a multiple of {shards} (with --grad-accum "
            "to keep the samples per step), or a mesh with fewer devices on its data and fsdp axes."
        )
    if job.pruned is None and job.prune.needs_calibration:
        rows = min(job.prune.batch_size, job.calibration.nsamples)
        if rows % shards:
            raise RestoreError(
                f"pruning calibrates in batches of {rows} sequences (PruneConfig.batch_size "
                f"{job.prune.batch_size}, --nsamples {job.calibration.nsamples}), which do not split over {where}; "
                f"use --nsamples and a pruning batch size that are multiples of {shards}."
            )


def _check_sources(job: Job) -> None:
    """Refuse a model path with a typo, or a --pruned that is no model, before --out is claimed (a run claims
    --out with its configuration, so the corrected command would find it holding a different one)."""
    check_source(job.model)
    if job.pruned is not None and not (Path(job.pruned) / META_FILE).is_file():  # else a model pruned elsewhere
        try:
            check_source(job.pruned)
        except SourceError as e:
            raise RestoreError(f"--pruned {job.pruned} is neither a folder written by scripts/prune.py (with "
                               f"{META_FILE}) nor a model pruned elsewhere: {e}") from e


# ----------------------------------------------------------------------------------- stages


def _stage_pairs(job: Job, samples, model, tokenizer):
    """The first num_probe training samples as contrastive pairs (with negatives)."""
    path = job.path("pairs.jsonl")
    if not path.exists():
        with stage(job, "pairs"):
            pairs = steps.probing_pairs(job.restore, samples, model, tokenizer)
        write_text(path, "".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in pairs))
    # read back, also right after writing: every process then probes with process 0's pairs
    return [ContrastivePair(**json.loads(line)) for line in path.read_text().splitlines()]


def _stage_dense_capture(job: Job, model, tokenizer, pairs):
    folder = job.path("dense_capture")
    if folder.exists():
        return CaptureSet.load(folder)
    with stage(job, "dense_capture"):
        captures = steps.dense_captures(job.restore, model, tokenizer, pairs, job.mesh)
        save_folder(folder, captures.save)
    return captures


def _stage_prune(job: Job, model, tokenizer, dtype):
    """The pruned model, its masks and (structured) head map: pruned here once, then reloaded."""
    folder = job.path("pruned")
    if job.pruned is not None and not folder.exists():
        if (Path(job.pruned) / "meta.json").is_file():  # scripts/prune.py output: masks and head map kept
            checkpoint = job.preloaded.pop(job.pruned, None) or load_pruned(job.pruned, dtype=dtype, mesh=job.mesh)
            return checkpoint.model, checkpoint.masks or masks_from_zeros(checkpoint.model), checkpoint.head_map
        # a model pruned elsewhere (HF folder, GGUF, hub id): masks from its exact zeros
        pruned, _, _ = load(job.pruned, dtype=dtype, mesh=job.mesh, tokenizer=False)
        if pruned.config.num_heads != model.config.num_heads:
            raise RestoreError(
                f"{job.pruned} has {pruned.config.num_heads} heads per layer, the dense model "
                f"{model.config.num_heads}; a structurally pruned model needs the head map that "
                "scripts/prune.py records, so prune it with scripts/prune.py --method flap."
            )
        return pruned, masks_from_zeros(pruned), None
    if folder.exists():
        checkpoint = load_pruned(folder, dtype=dtype, mesh=job.mesh)
        return checkpoint.model, checkpoint.masks, checkpoint.head_map
    with stage(job, "prune"):
        tokens = job.calibration.tokens(tokenizer) if job.prune.needs_calibration else None
        result = prune(model, tokens, job.prune, mesh=job.mesh)
    save_prune_result(folder, result, tokenizer, job.prune)
    return result.model, result.masks, result.head_map


def _stage_pruned_capture(job: Job, model, tokenizer, pairs, dense, head_map):
    path = job.path("pruned_capture.npy")
    if path.exists():
        return dense.replace(pruned_prompt=np.load(path), head_map=head_map)
    with stage(job, "pruned_capture"):
        captures = steps.pruned_captures(job.restore, model, tokenizer, pairs, dense, head_map, job.mesh)
    save_file(path, lambda tmp: np.save(tmp, captures.pruned_prompt))
    return captures


def _stage_components(job: Job, captures):
    path = job.path("components.npz")
    if path.exists():
        return LostComponents.load(path)
    with stage(job, "components"):
        components = steps.components(job.restore, captures)
    save_file(path, components.save)
    return components


def _stage_probes(job: Job, captures, components):
    path = job.path("probes.npz")
    if path.exists():
        return ProbeResult.load(path)
    with stage(job, "probes"):
        probes = steps.probes(captures, components, job.restore.probe_seed)
    save_file(path, probes.save)
    return probes


def _stage_train(job: Job, model, tokenizer, train_data, components, probes):
    """Train beta and b of the top-k heads; resumable from out/train_checkpoints (on any mesh)."""
    path = job.path("compensation.npz")
    comp = steps.init(job.restore, components, probes, model.config.num_layers)
    trainable, frozen = split_trainable(comp)
    if path.exists():
        stored = np.load(path)
        return merge_trainable({k: jnp.asarray(stored[k]) for k in trainable}, frozen)
    with stage(job, "train"):
        _, result = steps.train(job.restore, model, train_data, comp, mesh=job.mesh,
                                checkpoint_dir=str(job.path("train_checkpoints").absolute()))
    history = {"loss": result.history.get("loss", []), "valid_loss": result.history.get("valid_loss", []),
               "steps": result.steps, "tokens_seen": result.tokens_seen, "seconds": result.seconds}
    write_text(job.path("train_history.json"), json.dumps(history, indent=2) + "\n")
    trained = gather_to_host(result.trainable)
    save_file(path, lambda tmp: np.savez(tmp, **trained))
    return merge_trainable({k: jnp.asarray(v) for k, v in trained.items()}, frozen)


_apply_compensation = steps.apply_compensation  # fit's apply function (the name tests import)


def _stage_fold(job: Job, model, tokenizer, comp, masks):
    """Fold the compensation into o_proj's bias; check sparsity survived; save Orbax (+ HF)."""
    folder = job.path("restored")
    if folder.exists():
        restored, _, _ = load(folder, dtype=model.dtype, mesh=job.mesh, tokenizer=False)
    else:
        with stage(job, "fold"):
            restored = steps.fold(model, comp, masks)
        save_orbax(restored, tokenizer, folder)
    if job.export_hf and not job.done("restored_hf"):  # also when a run stopped between the two saves
        try:
            save_hf(restored, tokenizer, job.path("restored_hf"), overwrite=True)
        except ValueError as e:  # families transformers cannot express with an o_proj bias
            log.warning("no Hugging Face export: %s", e)
    return restored


def _stage_eval(job: Job, name: str, model, tokenizer) -> None:
    path = job.path(name)
    if path.exists():
        return
    r = job.restore
    with stage(job, name.removesuffix(".json")):
        result = perplexity_of_tokens(model, wikitext2_test_ids(tokenizer), r.eval_seqlen,
                                      limit_chunks=r.eval_limit_chunks, mesh=job.mesh, source="wikitext2")
    write_text(path, json.dumps({"wikitext2_ppl": result.ppl, "chunks": result.num_chunks, "seqlen": result.seqlen},
                                 indent=2) + "\n")


# ----------------------------------------------------------------------------------- bookkeeping


def _summary(job: Job, comp) -> dict[str, Any]:
    def ppl(name):
        return json.loads(job.path(name).read_text())["wikitext2_ppl"]

    timings_path = job.path("timings.json")
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    summary = {
        "model": job.model,
        "pruning": job.pruned or f"{job.prune.method} {job.prune.structured or job.prune.sparsity}",
        "ppl_dense": ppl("eval_dense.json"),
        "ppl_pruned": ppl("eval_pruned.json"),
        "ppl_restored": ppl("eval_restored.json"),
        "heads": int(comp.heads.shape[0]),
        "trainable_params": num_trainable(comp),
        "selected_heads": np.asarray(comp.heads).tolist(),  # l·H + h, the probe ranking's best first
        "stage_seconds": timings,
    }
    write_text(job.path("summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary
