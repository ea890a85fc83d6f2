"""The whole RestoreLCC job, stage by stage into one output folder, resumable.

    load -> dense eval -> pairs -> dense capture -> prune (or load pruned) -> pruned capture
         -> components -> probes -> train -> fold -> restored eval -> export

Each stage writes its result atomically into `out/` and is skipped when that result exists, so an
interrupted run resumes where it stopped, and a finished stage is never overwritten. Dense
activations are collected before the model is pruned in place, so the dense and the pruned weights
never live on the device together. `out/run.json` pins the configuration: a different one against the
same folder is refused unless `restart=True`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lcc_jax.data.calibration import CalibrationConfig
from lcc_jax.prune.api import PruneConfig
from lcc_jax.restore.config import RestoreConfig

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


class RestoreError(ValueError):
    """A restore job that cannot go on as asked (e.g. a changed configuration against an old folder)."""


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

    def path(self, name: str) -> Path:
        return self.out / name

    def done(self, name: str) -> bool:
        return self.path(name).exists()

    def fingerprint(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "pruned": self.pruned,
            "dtype": self.dtype,
            "restore": dataclasses.asdict(self.restore),
            "prune": None if self.pruned else dataclasses.asdict(self.prune),
            "calibration": None if self.pruned or not self.prune.needs_calibration else dataclasses.asdict(self.calibration),
        }


def run(job: Job, *, restart: bool = False) -> dict[str, Any]:
    """Run (or resume) every stage; returns the summary also written to out/summary.json."""
    _claim_folder(job, restart)
    dtype = jnp.bfloat16 if job.dtype == "bf16" else jnp.float32
    import lcc_jax

    with _timed(job, "load"):
        model, tokenizer, _ = lcc_jax.load(job.model, dtype=dtype, mesh=job.mesh)
    samples, pairs = _stage_pairs(job, model, tokenizer)
    _stage_eval(job, "eval_dense.json", model, tokenizer)
    dense = _stage_dense_capture(job, model, tokenizer, pairs)
    pruned_model, masks, head_map = _stage_prune(job, model, tokenizer, dtype)
    del model  # pruned in place (unstructured) or replaced (structured): the dense weights are gone
    _stage_eval(job, "eval_pruned.json", pruned_model, tokenizer)
    captures = _stage_pruned_capture(job, pruned_model, tokenizer, pairs, dense, head_map)
    components = _stage_components(job, captures)
    probes = _stage_probes(job, captures, components)
    comp = _stage_train(job, pruned_model, tokenizer, samples, components, probes)
    restored = _stage_fold(job, pruned_model, tokenizer, comp, masks)
    _stage_eval(job, "eval_restored.json", restored, tokenizer)
    return _summary(job, comp)


# ----------------------------------------------------------------------------------- stages


def _stage_pairs(job: Job, model, tokenizer):
    """Training samples, and the first num_probe of them as contrastive pairs (with negatives)."""
    from lcc_jax.data.instructions import load_instructions
    from lcc_jax.data.negatives import ContrastivePair, make_pairs

    r = job.restore
    samples = load_instructions(r.train_data, r.train_split, limit=r.num_train)
    path = job.path("pairs.jsonl")
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return samples, [ContrastivePair(**row) for row in rows]
    with _timed(job, "pairs"):
        pairs = make_pairs(samples, limit=r.num_probe, model=model, tokenizer=tokenizer)
    _write_text(path, "".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in pairs))
    return samples, pairs


def _stage_dense_capture(job: Job, model, tokenizer, pairs):
    from lcc_jax.restore.capture import CaptureSet, capture_dense

    folder = job.path("dense_capture")
    if folder.exists():
        return CaptureSet.load(folder)
    r = job.restore
    with _timed(job, "dense_capture"):
        captures = capture_dense(model, tokenizer, pairs, r.capture_batch_size, mesh=job.mesh, max_length=r.capture_length)
        _save_folder(folder, captures.save)
    return captures


def _stage_prune(job: Job, model, tokenizer, dtype):
    """The pruned model, its masks and (structured) head map: pruned here once, then reloaded."""
    from lcc_jax.checkpoint import load_pruned, save_pruned
    from lcc_jax.prune.api import prune
    from lcc_jax.prune.masks import masks_from_zeros, sparsity_report

    folder = job.path("pruned")
    if job.pruned is not None and not folder.exists():
        if (Path(job.pruned) / "meta.json").is_file():  # scripts/prune.py output: masks and head map kept
            checkpoint = load_pruned(job.pruned, dtype=dtype, mesh=job.mesh)
            return checkpoint.model, checkpoint.masks or masks_from_zeros(checkpoint.model), checkpoint.head_map
        import lcc_jax  # a model pruned elsewhere (HF folder, GGUF, hub id): masks from its exact zeros

        pruned, _, _ = lcc_jax.load(job.pruned, dtype=dtype, mesh=job.mesh, tokenizer=False)
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
    with _timed(job, "prune"):
        tokens = job.calibration.tokens(tokenizer) if job.prune.needs_calibration else None
        result = prune(model, tokens, job.prune, mesh=job.mesh)
    report = sparsity_report(result.model) if result.masks else None
    meta = {"prune": job.prune, "seconds": result.seconds, "sparsity_total": report.total if report else None,
            "config": result.model.config.to_hf()}
    save_pruned(folder, result.model, tokenizer, result.masks, head_map=result.head_map, meta=meta)
    return result.model, result.masks, result.head_map


def _stage_pruned_capture(job: Job, model, tokenizer, pairs, dense, head_map):
    from lcc_jax.restore.capture import capture_pruned, save_npy

    path = job.path("pruned_capture.npy")
    if not path.exists():
        with _timed(job, "pruned_capture"):
            pruned = capture_pruned(model, tokenizer, pairs, job.restore.capture_batch_size, mesh=job.mesh,
                                    max_length=job.restore.capture_length)
        save_npy(path, pruned)
    return dense.replace(pruned_prompt=np.load(path), head_map=head_map)


def _stage_components(job: Job, captures):
    from lcc_jax.restore.components import LostComponents, lost_components

    path = job.path("components.npz")
    if path.exists():
        return LostComponents.load(path)
    dense_q, _, _, pruned_q = captures.aligned()
    with _timed(job, "components"):
        components = lost_components(dense_q, pruned_q, k=job.restore.components)
    _save_file(path, components.save)
    return components


def _stage_probes(job: Job, captures, components):
    from lcc_jax.restore.probe import ProbeResult, train_probes

    path = job.path("probes.npz")
    if path.exists():
        return ProbeResult.load(path)
    _, positive, negative, pruned_q = captures.aligned()
    with _timed(job, "probes"):
        probes = train_probes(pruned_q, components.component, positive, negative)
    _save_file(path, probes.save)
    return probes


def _stage_train(job: Job, model, tokenizer, samples, components, probes):
    """Train beta and b of the top-k heads; resumable from out/train_checkpoints."""
    from lcc_jax.data.instructions import load_instructions
    from lcc_jax.data.batching import make_batches
    from lcc_jax.data.sft import encode_pairs
    from lcc_jax.restore.compensation import init_compensation, merge_trainable, split_trainable
    from lcc_jax.restore.train import TrainConfig, epoch_batches, fit

    path = job.path("compensation.npz")
    r = job.restore
    comp = init_compensation(components.basis, probes.ranking, r.top_k if r.top_k < 1 else int(r.top_k),
                             jax.random.key(r.seed), std=r.init_std, mode=r.mode, random_heads=r.random_heads)
    trainable, frozen = split_trainable(comp)
    if path.exists():
        stored = np.load(path)
        return merge_trainable({k: jnp.asarray(stored[k]) for k in trainable}, frozen)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    # The reference trains on prompt + response with no EOS (trl's completion-only collator on "text").
    sequences, loss_masks = encode_pairs(tokenizer, [s.prompt for s in samples], [s.response for s in samples],
                                         max_len=r.max_length, add_eos=False)
    config = TrainConfig(learning_rate=r.learning_rate, epochs=r.epochs, batch_size=r.batch_size,
                         grad_accum=r.grad_accum, compute_dtype=r.compute_dtype, remat=r.remat, seed=r.seed)
    valid = None
    if r.valid_data and r.valid_data != "none":
        valid_samples = load_instructions(r.valid_data, "validation", limit=r.num_valid)
        v_seq, v_mask = encode_pairs(tokenizer, [s.prompt for s in valid_samples], [s.response for s in valid_samples],
                                     max_len=r.max_length, add_eos=False)
        valid = make_batches(v_seq, r.batch_size, pad_id=pad, loss_masks=v_mask, order="length")
    with _timed(job, "train"):
        result = fit(model, trainable, _apply_compensation, epoch_batches(sequences, loss_masks, config, pad_id=pad),
                     config, valid_batches=valid, checkpoint_dir=str(job.path("train_checkpoints").absolute()),
                     mesh=job.mesh, constants=frozen)
    history = {"loss": result.history.get("loss", []), "valid_loss": result.history.get("valid_loss", []),
               "steps": result.steps, "tokens_seen": result.tokens_seen, "seconds": result.seconds}
    _write_text(job.path("train_history.json"), json.dumps(history, indent=2) + "\n")
    _save_file(path, lambda p: np.savez(p, **{k: np.asarray(v) for k, v in result.trainable.items()}))
    return merge_trainable(result.trainable, frozen)


def _apply_compensation(model, trainable, tokens, mask, *, constants, remat=False):
    from lcc_jax.restore.compensation import to_dense

    delta = to_dense(trainable, constants, model.config)  # (layers, heads, head_dim)
    return model(tokens, mask, compensation=delta.astype(model.dtype), remat=remat).logits


def _stage_fold(job: Job, model, tokenizer, comp, masks):
    """Fold the compensation into o_proj's bias; check sparsity survived; save Orbax (+ HF)."""
    from lcc_jax.convert.export import save_hf, save_orbax
    from lcc_jax.prune.masks import masks_from_zeros
    from lcc_jax.restore.compensation import dense_compensation
    from lcc_jax.restore.fold import fold_compensation

    folder = job.path("restored")
    if folder.exists():
        import lcc_jax

        restored, _, _ = lcc_jax.load(folder, dtype=model.dtype, mesh=job.mesh, tokenizer=False)
        return restored
    with _timed(job, "fold"):
        restored = fold_compensation(model, dense_compensation(comp, model.config))
        after = masks_from_zeros(restored, list(masks))
        changed = [p for p in masks if bool(jnp.any(after[p] & ~masks[p]))]
        if changed:
            raise RestoreError(f"folding revived pruned weights in {changed}; this is a bug, please report it.")
    save_orbax(restored, tokenizer, folder)
    if job.export_hf:
        try:
            save_hf(restored, tokenizer, job.path("restored_hf"), overwrite=True)
        except ValueError as e:  # families transformers cannot express with an o_proj bias
            log.warning("no Hugging Face export: %s", e)
    return restored


def _stage_eval(job: Job, name: str, model, tokenizer) -> None:
    from lcc_jax.eval.perplexity import perplexity

    path = job.path(name)
    if path.exists():
        return
    r = job.restore
    with _timed(job, name.removesuffix(".json")):
        result = perplexity(model, tokenizer, "wikitext2", seqlen=r.eval_seqlen, limit_chunks=r.eval_limit_chunks,
                            mesh=job.mesh)
    _write_text(path, json.dumps({"wikitext2_ppl": result.ppl, "chunks": result.num_chunks, "seqlen": result.seqlen},
                                 indent=2) + "\n")


# ----------------------------------------------------------------------------------- bookkeeping


def _summary(job: Job, comp) -> dict[str, Any]:
    from lcc_jax.restore.compensation import num_trainable

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
        "stage_seconds": timings,
    }
    _write_text(job.path("summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


def _claim_folder(job: Job, restart: bool) -> None:
    run_file = job.path(RUN_FILE)
    fingerprint = json.loads(json.dumps(job.fingerprint(), default=str))
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous != fingerprint:
            if not restart:
                changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
                raise RestoreError(
                    f"{job.out} holds a run with a different configuration (changed: {', '.join(changed)}). "
                    "Use a new --out folder, or pass --restart to discard the old results."
                )
            shutil.rmtree(job.out)
    job.out.mkdir(parents=True, exist_ok=True)
    if not run_file.exists():
        _write_text(run_file, json.dumps(fingerprint, indent=2) + "\n")


class _timed:
    """Record a stage's wall time in out/timings.json (kept across resumed runs)."""

    def __init__(self, job: Job, stage: str):
        self.job, self.stage = job, stage

    def __enter__(self):
        self.start = time.perf_counter()
        log.info("stage %s ...", self.stage)

    def __exit__(self, kind, *_):
        if kind is not None:
            return
        seconds = time.perf_counter() - self.start
        path = self.job.path("timings.json")
        timings = json.loads(path.read_text()) if path.exists() else {}
        timings[self.stage] = round(seconds, 2)
        _write_text(path, json.dumps(timings, indent=2) + "\n")
        log.info("stage %s done in %.1f s", self.stage, seconds)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _save_file(path: Path, save) -> None:
    """save(tmp_path) then rename: a stage's file appears whole or not at all."""
    tmp = path.with_name(f".tmp.{path.name}")  # ends in .npz, so np.savez adds no suffix
    save(tmp)
    tmp.replace(path)


def _save_folder(folder: Path, save) -> None:
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    tmp.replace(folder)

