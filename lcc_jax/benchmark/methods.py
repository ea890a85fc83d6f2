"""The recovery benchmark's methods and scoring: one function per method, each starting from a setting's
pruned checkpoint and returning its row (scores as exported, trainable parameters, training time, tokens).

Every method trains with the shared trainer (`lcc_jax.train.fit`) on RestoreLCC's own samples and budget
(`restore.steps.training_data`); RestoreLCC itself is the whole `restore.pipeline` job.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from lcc_jax.baselines import PRESETS as LORA_PRESETS
from lcc_jax.baselines import (
    LofitConfig,
    merge_head_vectors,
    num_trainable,
    surviving_sparsity,
    train_lofit,
    train_merged_lora,
)
from lcc_jax.baselines.lofit import LOFIT_REFERENCE, num_selection_params
from lcc_jax.benchmark.cells import write_json
from lcc_jax.benchmark.config import RecoveryConfig, compute_dtype, parse_setting
from lcc_jax.checkpoint import load_pruned
from lcc_jax.convert.load import load
from lcc_jax.eval.perplexity import perplexity_of_tokens, wikitext2_test_ids
from lcc_jax.eval.zeroshot import zeroshot
from lcc_jax.restore.compensation import num_trainable as compensation_params
from lcc_jax.restore.config import PRESETS, RestoreConfig
from lcc_jax.restore.pipeline import Job
from lcc_jax.restore.pipeline import run as run_job
from lcc_jax.restore.steps import training_data

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Context:
    """One (setting, seed): where its results go and the pruned checkpoint, data and budget every method starts from."""

    source: str
    setting_dir: Path  # <out>/<setting slug>: pruned/, pruned.json, seed<k>/
    setting: str
    seed: int
    config: RecoveryConfig
    mesh: Any
    loaded: Any = None  # benchmark.loaded.Loaded: the run's models, tokenizer and data, read once (else per cell)
    _data: Any = None

    @property
    def out(self) -> Path:
        return self.setting_dir / f"seed{self.seed}"

    @property
    def pruned_dir(self) -> Path:
        return self.setting_dir / "pruned"

    @property
    def checkpoint(self):
        """A fresh copy of the pruned model (methods must not see each other's changes), masks, head map."""
        if self.loaded is not None:
            return self.loaded.pruned(self.pruned_dir)
        return load_pruned(self.pruned_dir, dtype=compute_dtype(self.config), mesh=self.mesh)

    @property
    def restore(self) -> RestoreConfig:
        return dataclasses.replace(self.config.restore, seed=self.config.restore.seed + self.seed)

    def train_config(self, learning_rate: float | None = None):
        return self.restore.train_config(learning_rate)

    def data(self, tokenizer):
        """(train_batches_fn, validation batches): RestoreLCC's own samples, encoding and shuffles."""
        if self._data is None:
            self._data = (training_data(self.restore, tokenizer) if self.loaded is None
                          else self.loaded.training_data(self.restore))
        return self._data.epoch_batches(self.train_config()), self._data.valid


# ------------------------------------------------------------------------------------------ methods

LOFIT_REFERENCE_SHARE = LOFIT_REFERENCE.top_k.resolve(1024) / 1024  # 32 of Llama-2-7B's 1,024 heads: 3.125 %
LOFIT_REFERENCE_EPOCHS = 5


def valid_fields(history: dict) -> dict:
    """The Alpaca validation loss after the last epoch (and per epoch) of a training history: the one figure every
    method's cell has that may choose between settings (never WikiText-2 or the zero-shot tasks). The same
    validation samples for every method of a run (`Context.data`); {} when the run had no validation set."""
    per_epoch = [float(x) for x in history.get("valid_loss") or []]
    return {"valid_loss": per_epoch[-1], "valid_loss_per_epoch": per_epoch} if per_epoch else {}


def _lora_runner(preset: str) -> Callable[[Context], dict]:
    def run(ctx: Context) -> dict:
        cp = ctx.checkpoint
        lora_config = LORA_PRESETS[preset]
        batches, valid = ctx.data(cp.tokenizer)
        merged, result = train_merged_lora(cp.model, cp.masks, batches, valid,
                                           ctx.train_config(ctx.config.lora_learning_rate), lora_config,
                                           ctx.restore.seed, ctx.mesh)
        return {**scores(merged, cp.tokenizer, ctx.config, ctx.mesh), **export_audit(merged, cp.masks),
                "trainable_params": num_trainable(result.trainable), "train_seconds": result.train.seconds,
                "tokens_seen": result.train.tokens_seen, "steps": result.train.steps,
                **valid_fields(result.train.history)}

    return run


def _lofit_runner(reference: bool) -> Callable[[Context], dict]:
    """LoFiT budget-matched (RestoreLCC's head count and epochs) or at its reference setting (the share of heads
    of its Llama-2-7B runs, 32 of 1,024, and 5 epochs for each step)."""

    def run(ctx: Context) -> dict:
        cp = ctx.checkpoint
        batches, valid = ctx.data(cp.tokenizer)
        top_k = LOFIT_REFERENCE_SHARE if reference else ctx.restore.top_k
        lofit_config = LofitConfig(top_k=top_k, select_learning_rate=ctx.config.lofit_select_learning_rate,
                                   bias_learning_rate=ctx.config.lofit_bias_learning_rate)
        train_config = ctx.train_config()
        if reference:
            train_config = dataclasses.replace(train_config, epochs=LOFIT_REFERENCE_EPOCHS)
        result = train_lofit(cp.model, batches, train_config, lofit_config, jax.random.key(ctx.restore.seed),
                             valid_batches=valid, mesh=ctx.mesh)
        merged = merge_head_vectors(cp.model, result.compensation)
        select, bias = result.selection.train, result.train
        return {**scores(merged, cp.tokenizer, ctx.config, ctx.mesh), **export_audit(merged, cp.masks),
                "trainable_params": compensation_params(result.compensation),
                "selection_params": num_selection_params(cp.model.config),
                "heads": int(result.compensation.heads.shape[0]), "epochs": train_config.epochs,
                "train_seconds": select.seconds + bias.seconds, "tokens_seen": select.tokens_seen + bias.tokens_seen,
                "steps": select.steps + bias.steps, **valid_fields(bias.history)}  # the bias step's model is kept

    return run


def _restorelcc_runner(mode: str, job_name: str, preset: str | None = None) -> Callable[[Context], dict]:
    """The whole RestoreLCC job (in `mode`, or a `RestoreConfig` preset's recovery settings) on the setting's
    pruned checkpoint, into seed<k>/<job_name>."""

    def run(ctx: Context) -> dict:
        job_dir = ctx.out / job_name
        restore = dataclasses.replace(ctx.restore, mode=mode, **(PRESETS[preset] if preset else {}))
        job = Job(model=ctx.source, out=job_dir, restore=restore, prune=parse_setting(ctx.setting),
                  calibration=ctx.config.calibration, pruned=str(ctx.pruned_dir), dtype=ctx.config.dtype,
                  mesh=ctx.mesh, export_hf=False, preloaded=ctx.loaded.for_job(ctx.pruned_dir) if ctx.loaded else {})
        _seed_evaluations(job_dir, ctx)
        _share_dense_stages(job_dir, ctx)
        summary = run_job(job)
        restored, _, _ = load(job_dir / "restored", dtype=compute_dtype(ctx.config), mesh=ctx.mesh,
                                      tokenizer=False)
        cp = ctx.checkpoint
        history = json.loads((job_dir / "train_history.json").read_text())
        # perplexity measured again (one pass) rather than taken from the job: the cell keeps per-chunk NLLs
        return {**scores(restored, cp.tokenizer, ctx.config, ctx.mesh),
                **export_audit(restored, cp.masks), "trainable_params": summary["trainable_params"],
                "heads": summary["heads"], "train_seconds": history["seconds"], "tokens_seen": history["tokens_seen"],
                "steps": history["steps"], "stage_seconds": summary["stage_seconds"], **valid_fields(history)}

    return run


RUNNERS: dict[str, Callable[[Context], dict]] = {
    "lora": _lora_runner("wanda"),
    "dora": _lora_runner("dora"),
    "masked_lora": _lora_runner("masked"),
    "lofit": _lofit_runner(reference=False),
    "lofit_reference": _lofit_runner(reference=True),
    "bias_only": _restorelcc_runner("bias_only", "bias_only_job"),  # RestoreLCC's ablation, no β·V term
    "restorelcc": _restorelcc_runner("full", "restorelcc_job"),
    "restorelcc_recipe": _restorelcc_runner("full", "restorelcc_recipe_job", preset="recipe"),  # study's choice
}


# ------------------------------------------------------------------------------------------ scoring


def wikitext2_perplexity(model, tokenizer, config: RecoveryConfig, mesh):
    """The benchmark's WikiText-2 perplexity (`eval.perplexity.Perplexity`), at the budget's length and chunks."""
    r = config.restore
    return perplexity_of_tokens(model, wikitext2_test_ids(tokenizer), r.eval_seqlen, limit_chunks=r.eval_limit_chunks,
                                mesh=mesh, source="wikitext2")  # tokenized once per tokenizer


def scores(model, tokenizer, config: RecoveryConfig, mesh) -> dict:
    """WikiText-2 perplexity and the zero-shot tasks, as fractions, with what paired intervals need
    (`eval.bootstrap`): each chunk's mean NLL (`ppl_chunk_nll`) and each document's 0/1 outcome per task
    (`correct`, `correct_norm` bit strings)."""
    row: dict[str, Any] = {}
    started = time.perf_counter()
    ppl = wikitext2_perplexity(model, tokenizer, config, mesh)
    row["ppl"], row["ppl_chunk_nll"] = float(ppl.ppl), list(ppl.chunk_nll)
    if config.tasks:
        result = zeroshot(model, tokenizer, config.tasks, limit=config.limit, batch_size=config.zeroshot_batch_size,
                          mesh=mesh)
        row["zeroshot"] = {name: {"acc": t.acc, "acc_norm": t.acc_norm, "n": t.n, "correct": t.correct,
                                  "correct_norm": t.correct_norm} for name, t in result.tasks.items()}
        row["mean_acc"] = result.suite_mean if result.suite_mean is not None else result.mean
        row["mean_of"] = "suite" if result.suite_mean is not None else f"{len(result.tasks)} tasks"
    row["eval_seconds"] = time.perf_counter() - started
    return row


def export_audit(model, masks) -> dict:
    """Parameters of the exported model and the pruning sparsity it keeps (unstructured masks only)."""
    row: dict[str, Any] = {"params": num_trainable(nnx.state(model, nnx.Param))}
    if masks:
        survival = surviving_sparsity(model, masks)
        row.update(sparsity_target=survival.target, sparsity_after_export=survival.surviving,
                   revived_weights=survival.revived)
    return row


# ------------------------------------------------------------------------------------------ reuse


def _seed_evaluations(job_dir: Path, ctx: Context) -> None:
    """Give the job the dense and pruned perplexities already measured (same function, same settings)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    for name, path in (("eval_dense.json", ctx.setting_dir.parent / "dense.json"),
                       ("eval_pruned.json", ctx.setting_dir / "pruned.json")):
        target = job_dir / name
        if not target.exists() and path.exists():
            write_json(target, {"wikitext2_ppl": json.loads(path.read_text())["ppl"], "chunks": None,
                                "seqlen": ctx.restore.eval_seqlen})


def _share_dense_stages(job_dir: Path, ctx: Context) -> None:
    """Reuse another job's probing pairs and dense captures: they depend only on the dense model, the data
    and the capture settings, which every job of one benchmark shares (its fingerprint pins them)."""
    if (job_dir / "pairs.jsonl").exists():
        return
    for other in sorted(ctx.setting_dir.parent.glob("*/seed*/*_job")):
        if other == job_dir or not (other / "pairs.jsonl").exists() or not (other / "dense_capture").is_dir():
            continue
        staging = job_dir / ".dense_capture.shared"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(other / "dense_capture", staging, copy_function=_link_or_copy)
        staging.replace(job_dir / "dense_capture")
        shutil.copyfile(other / "pairs.jsonl", job_dir / ".pairs.jsonl.tmp")
        (job_dir / ".pairs.jsonl.tmp").replace(job_dir / "pairs.jsonl")
        log.info("reusing the probing pairs and dense captures of %s", other)
        return


def _link_or_copy(src: str, dst: str) -> None:
    """Hard link (stage files are replaced, never written in place), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
