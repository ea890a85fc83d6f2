"""The recovery benchmark: dense, pruned, and each recovery method on the same pruned models, budget and data.

    config = RecoveryConfig(settings=("wanda:0.5", "sparsegpt:2:4", "flap:0.2"))
    results = run_recovery("smollm2-135m", Path("out/recovery"), config)

For every pruning setting the dense model is pruned once (`<setting>/pruned`, a scripts/prune.py
checkpoint) and every method starts from that checkpoint, seed by seed:

    lora        LoRA, the Wanda paper's recipe (q, v; r 8, alpha 16), merged into the kernels
    dora        DoRA on all projections, merged
    masked_lora LoRA on all projections with the merged update masked by the pruning mask
    lofit       LoFiT (L1 head selection, then per-head biases), folded into o_proj's bias
    bias_only   RestoreLCC's bias-only ablation on the probe ranking of the RestoreLCC run
    restorelcc  the whole RestoreLCC job (`restore.pipeline`), folded into o_proj's bias

All of them train with the shared trainer on the same samples, epochs and batch as RestoreLCC (its
`RestoreConfig`); only the learning rates differ, each method's published one. Every model is
scored as it would be exported (adapters merged, vectors folded): WikiText-2 perplexity, the
zero-shot tasks, and the sparsity that survives the merge. Each cell's result is written atomically
to `<setting>/seed<k>/<method>.json` and skipped when present, so a stopped run resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lcc_jax.data.calibration import CalibrationConfig
from lcc_jax.prune.api import PruneConfig
from lcc_jax.restore.config import RestoreConfig

log = logging.getLogger(__name__)

METHODS = ("lora", "dora", "masked_lora", "lofit", "bias_only", "restorelcc")
DEFAULT_METHODS = ("lora", "dora", "lofit", "restorelcc")
DEFAULT_SETTINGS = ("wanda:0.5", "sparsegpt:2:4", "flap:0.2")
CONFIG_FILE = "benchmark.json"


class RecoveryError(ValueError):
    """A benchmark that cannot run as asked."""


@dataclasses.dataclass(frozen=True)
class RecoveryConfig:
    """What the benchmark runs. `restore` is the shared training budget (samples, epochs, batch, lengths)."""

    settings: tuple[str, ...] = DEFAULT_SETTINGS  # "<method>:<sparsity or N:M>", "flap:<ratio>"
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = (0,)
    tasks: str | None = "all"  # zero-shot tasks (lcc_jax.eval.tasks names, "suite", "all"); None: perplexity only
    limit: int | None = None  # zero-shot: first N documents per task
    zeroshot_batch_size: int = 32
    dtype: str = "fp32"
    restore: RestoreConfig = RestoreConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    prune_batch_size: int = 8
    lora_learning_rate: float = 1e-4  # Wanda §5 / DoRA's LLaMA runs
    lofit_select_learning_rate: float = 5e-3  # LoFiT's Llama-2-7B scripts
    lofit_bias_learning_rate: float = 1e-2

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise RecoveryError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
        if not self.settings or not self.seeds:
            raise RecoveryError("give at least one pruning setting and one seed.")
        for setting in self.settings:
            parse_setting(setting)
        if self.dtype not in ("fp32", "bf16"):
            raise RecoveryError(f"dtype must be fp32 or bf16, not {self.dtype!r}.")

    def fingerprint(self) -> dict[str, Any]:
        """What changes a cell's result (the lists of settings, methods and seeds may grow between runs)."""
        out = dataclasses.asdict(self)
        for key in ("settings", "methods", "seeds", "zeroshot_batch_size"):
            out.pop(key)
        return json.loads(json.dumps(out, default=str))


def parse_setting(setting: str) -> PruneConfig:
    """"wanda:0.5" / "sparsegpt:2:4" / "flap:0.2" -> PruneConfig."""
    method, sep, amount = setting.partition(":")
    if not sep or not amount:
        raise RecoveryError(f"pruning setting {setting!r} must look like 'wanda:0.5', 'sparsegpt:2:4' or 'flap:0.2'.")
    try:
        if method == "flap":
            return PruneConfig(method="flap", sparsity=None, structured=float(amount))
        return PruneConfig(method=method, sparsity=amount)
    except ValueError as e:
        raise RecoveryError(f"pruning setting {setting!r}: {e}") from e


def setting_slug(setting: str) -> str:
    """A folder name for a setting: "sparsegpt:2:4" -> "sparsegpt-2of4"."""
    method, _, amount = setting.partition(":")
    return f"{method}-{amount.replace(':', 'of')}"


# ------------------------------------------------------------------------------------------ runner


@dataclasses.dataclass
class _Context:
    """One (setting, seed): the pruned checkpoint, data and budget every method starts from."""

    source: str
    out: Path
    setting: str
    seed: int
    config: RecoveryConfig
    pruned_dir: Path
    mesh: Any
    _checkpoint: Any = None
    _data: Any = None

    @property
    def checkpoint(self):
        """A fresh copy of the pruned model (methods must not see each other's changes), masks, head map."""
        from lcc_jax.checkpoint import load_pruned

        return load_pruned(self.pruned_dir, dtype=_dtype(self.config), mesh=self.mesh)

    @property
    def restore(self) -> RestoreConfig:
        return dataclasses.replace(self.config.restore, seed=self.config.restore.seed + self.seed)

    def train_config(self, learning_rate: float | None = None):
        from lcc_jax.restore.train import TrainConfig

        r = self.restore
        return TrainConfig(learning_rate=r.learning_rate if learning_rate is None else learning_rate, epochs=r.epochs,
                           batch_size=r.batch_size, grad_accum=r.grad_accum, compute_dtype=r.compute_dtype,
                           remat=r.remat, seed=r.seed)

    def data(self, tokenizer):
        """(train_batches_fn, validation batches): RestoreLCC's own samples, encoding and shuffles."""
        from lcc_jax.restore.train_data import training_data

        if self._data is None:
            self._data = training_data(self.restore, tokenizer)
        return self._data.epoch_batches(self.train_config()), self._data.valid


def run_recovery(source: str, out: Path, config: RecoveryConfig, *, mesh=None, restart: bool = False) -> dict:
    """Run (or resume) every cell; returns and writes `results.json` (and the table and charts)."""
    from lcc_jax.eval.recovery_table import write_report

    out = Path(out)
    _claim(out, config, restart)
    _dense_cell(source, out, config, mesh)
    for setting in config.settings:
        folder = out / setting_slug(setting)
        pruned_dir = _prune_cell(source, folder, setting, config, mesh)
        for seed in config.seeds:
            ctx = _Context(source, folder / f"seed{seed}", setting, seed, config, pruned_dir, mesh)
            for method in config.methods:
                path = ctx.out / f"{method}.json"
                if path.exists():
                    log.info("%s / seed %d / %s: done already", setting, seed, method)
                    continue
                log.info("%s / seed %d / %s ...", setting, seed, method)
                row = RUNNERS[method](ctx)
                _write_json(path, {"setting": setting, "method": method, "seed": seed, **row})
                write_report(out, config)  # a table after every cell, so a stopped run shows what it has
    return write_report(out, config)


def _dense_cell(source: str, out: Path, config: RecoveryConfig, mesh) -> None:
    import lcc_jax

    path = out / "dense.json"
    if path.exists():
        return
    model, tokenizer, _ = lcc_jax.load(source, dtype=_dtype(config), mesh=mesh)
    row = {"setting": "dense", "method": "dense", "seed": None, **_scores(model, tokenizer, config, mesh),
           "params": _param_count(model)}
    _write_json(path, row)


def _prune_cell(source: str, folder: Path, setting: str, config: RecoveryConfig, mesh) -> Path:
    """Prune once per setting (saved like scripts/prune.py does) and score the pruned model."""
    import lcc_jax
    from lcc_jax.checkpoint import load_pruned, save_pruned
    from lcc_jax.prune.api import prune
    from lcc_jax.prune.masks import sparsity_report

    pruned_dir = folder / "pruned"
    prune_config = dataclasses.replace(parse_setting(setting), batch_size=config.prune_batch_size)
    if not pruned_dir.exists():
        model, tokenizer, _ = lcc_jax.load(source, dtype=_dtype(config), mesh=mesh)
        tokens = config.calibration.tokens(tokenizer) if prune_config.needs_calibration else None
        result = prune(model, tokens, prune_config, mesh=mesh)
        report = sparsity_report(result.model) if result.masks else None
        meta = {"prune": prune_config, "seconds": result.seconds, "sparsity_total": report.total if report else None,
                "config": result.model.config.to_hf()}
        save_pruned(pruned_dir, result.model, tokenizer, result.masks, head_map=result.head_map, meta=meta)
        del model, result
    path = folder / "pruned.json"
    if not path.exists():
        checkpoint = load_pruned(pruned_dir, dtype=_dtype(config), mesh=mesh)
        meta = json.loads((pruned_dir / "meta.json").read_text())
        row = {"setting": setting, "method": "pruned", "seed": None,
               **_scores(checkpoint.model, checkpoint.tokenizer, config, mesh),
               **_export_audit(checkpoint.model, checkpoint.masks), "prune_seconds": meta.get("seconds")}
        _write_json(path, row)
    return pruned_dir


# ------------------------------------------------------------------------------------------ methods


def _lora_runner(preset: str) -> Callable[[_Context], dict]:
    def run(ctx: _Context) -> dict:
        from lcc_jax.baselines import PRESETS, merge_lora, num_trainable, train_lora

        cp = ctx.checkpoint
        lora_config = PRESETS[preset]
        batches, valid = ctx.data(cp.tokenizer)
        result = train_lora(cp.model, batches, ctx.train_config(ctx.config.lora_learning_rate), lora_config,
                            jax.random.key(ctx.restore.seed), masks=cp.masks if lora_config.masked else None,
                            valid_batches=valid, mesh=ctx.mesh)
        merged = merge_lora(cp.model, result.trainable, result.setup)
        return {**_scores(merged, cp.tokenizer, ctx.config, ctx.mesh), **_export_audit(merged, cp.masks),
                "trainable_params": num_trainable(result.trainable), **_train_row(result.train)}

    return run


def _lofit(ctx: _Context) -> dict:
    from lcc_jax.baselines import LofitConfig, merge_head_vectors, train_lofit
    from lcc_jax.baselines.lofit import num_selection_params
    from lcc_jax.restore.compensation import num_trainable

    cp = ctx.checkpoint
    batches, valid = ctx.data(cp.tokenizer)
    lofit_config = LofitConfig(top_k=ctx.restore.top_k if ctx.restore.top_k < 1 else int(ctx.restore.top_k),
                               select_learning_rate=ctx.config.lofit_select_learning_rate,
                               bias_learning_rate=ctx.config.lofit_bias_learning_rate)
    result = train_lofit(cp.model, batches, ctx.train_config(), lofit_config, jax.random.key(ctx.restore.seed),
                         valid_batches=valid, mesh=ctx.mesh)
    merged = merge_head_vectors(cp.model, result.compensation)
    select, bias = result.selection.train, result.train
    return {**_scores(merged, cp.tokenizer, ctx.config, ctx.mesh), **_export_audit(merged, cp.masks),
            "trainable_params": num_trainable(result.compensation),
            "selection_params": num_selection_params(cp.model.config), "heads": int(result.compensation.heads.shape[0]),
            "train_seconds": select.seconds + bias.seconds, "tokens_seen": select.tokens_seen + bias.tokens_seen,
            "steps": select.steps + bias.steps}


def _restorelcc(ctx: _Context) -> dict:
    """The whole RestoreLCC job on the shared pruned checkpoint; dense/pruned perplexities are reused."""
    import lcc_jax
    from lcc_jax.restore.pipeline import Job, run

    job_dir = ctx.out / "restorelcc_job"
    job = Job(model=ctx.source, out=job_dir, restore=ctx.restore, prune=parse_setting(ctx.setting),
              calibration=ctx.config.calibration, pruned=str(ctx.pruned_dir), dtype=ctx.config.dtype, mesh=ctx.mesh,
              export_hf=False)
    _seed_evaluations(job_dir, ctx)
    _share_dense_stages(job_dir, ctx)
    summary = run(job)
    restored, _, _ = lcc_jax.load(job_dir / "restored", dtype=_dtype(ctx.config), mesh=ctx.mesh, tokenizer=False)
    cp = ctx.checkpoint
    history = json.loads((job_dir / "train_history.json").read_text())
    return {**_scores(restored, cp.tokenizer, ctx.config, ctx.mesh, ppl=summary["ppl_restored"]),
            **_export_audit(restored, cp.masks), "trainable_params": summary["trainable_params"],
            "heads": summary["heads"], "train_seconds": history["seconds"], "tokens_seen": history["tokens_seen"],
            "steps": history["steps"], "stage_seconds": summary["stage_seconds"]}


def _bias_only(ctx: _Context) -> dict:
    """RestoreLCC's bias-only ablation (mode="bias_only") through the same pipeline."""
    return _restorelcc(dataclasses.replace(ctx, config=dataclasses.replace(
        ctx.config, restore=dataclasses.replace(ctx.config.restore, mode="bias_only")), out=ctx.out / "bias_only"))


RUNNERS: dict[str, Callable[[_Context], dict]] = {
    "lora": _lora_runner("wanda"),
    "dora": _lora_runner("dora"),
    "masked_lora": _lora_runner("masked"),
    "lofit": _lofit,
    "bias_only": _bias_only,
    "restorelcc": _restorelcc,
}


# ------------------------------------------------------------------------------------------ scoring


def _scores(model, tokenizer, config: RecoveryConfig, mesh, *, ppl: float | None = None) -> dict:
    """WikiText-2 perplexity (unless given) and the zero-shot tasks, as fractions."""
    from lcc_jax.eval.perplexity import perplexity
    from lcc_jax.eval.zeroshot import zeroshot

    r = config.restore
    row: dict[str, Any] = {}
    started = time.perf_counter()
    if ppl is None:
        ppl = perplexity(model, tokenizer, "wikitext2", seqlen=r.eval_seqlen, limit_chunks=r.eval_limit_chunks,
                         mesh=mesh).ppl
    row["ppl"] = float(ppl)
    if config.tasks:
        result = zeroshot(model, tokenizer, config.tasks, limit=config.limit, batch_size=config.zeroshot_batch_size,
                          mesh=mesh)
        row["zeroshot"] = {name: {"acc": t.acc, "acc_norm": t.acc_norm, "n": t.n} for name, t in result.tasks.items()}
        row["mean_acc"] = result.suite_mean if result.suite_mean is not None else result.mean
        row["mean_of"] = "suite" if result.suite_mean is not None else f"{len(result.tasks)} tasks"
    row["eval_seconds"] = time.perf_counter() - started
    return row


def _export_audit(model, masks) -> dict:
    """Parameters of the exported model and the pruning sparsity it keeps (unstructured masks only)."""
    from lcc_jax.baselines import surviving_sparsity

    row: dict[str, Any] = {"params": _param_count(model)}
    if masks:
        survival = surviving_sparsity(model, masks)
        row.update(sparsity_target=survival.target, sparsity_after_export=survival.surviving,
                   revived_weights=survival.revived)
    return row


def _train_row(train) -> dict:
    return {"train_seconds": train.seconds, "tokens_seen": train.tokens_seen, "steps": train.steps}


def _param_count(model) -> int:
    from flax import nnx

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _seed_evaluations(job_dir: Path, ctx: _Context) -> None:
    """Give the job the dense and pruned perplexities already measured (same function, same settings)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    r = ctx.restore
    root = ctx.out.parent.parent if ctx.out.name == "bias_only" else ctx.out.parent
    for name, path in (("eval_dense.json", root.parent / "dense.json"), ("eval_pruned.json", root / "pruned.json")):
        target = job_dir / name
        if not target.exists() and path.exists():
            ppl = json.loads(path.read_text())["ppl"]
            chunks = json.loads(path.read_text()).get("chunks")
            _write_json(target, {"wikitext2_ppl": ppl, "chunks": chunks, "seqlen": r.eval_seqlen})


def _share_dense_stages(job_dir: Path, ctx: _Context) -> None:
    """Reuse another job's probing pairs and dense captures: they depend only on the dense model, the data
    and the capture settings, which every job of one benchmark shares (its fingerprint pins them)."""
    if (job_dir / "pairs.jsonl").exists():
        return
    root = ctx.out.parent.parent if ctx.out.name == "bias_only" else ctx.out.parent
    for other in sorted(root.parent.glob("*/seed*/**/restorelcc_job")):
        if other == job_dir or not (other / "pairs.jsonl").exists() or not (other / "dense_capture").is_dir():
            continue
        staging = job_dir / ".dense_capture.shared"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(other / "dense_capture", staging, copy_function=_link_or_copy)
        staging.replace(job_dir / "dense_capture")
        _write_json_text(job_dir / "pairs.jsonl", (other / "pairs.jsonl").read_text())
        log.info("reusing the probing pairs and dense captures of %s", other)
        return


def _link_or_copy(src: str, dst: str) -> None:
    """Hard link (stage files are replaced, never written in place), else copy."""
    import os

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ------------------------------------------------------------------------------------------ bookkeeping


def _claim(out: Path, config: RecoveryConfig, restart: bool) -> None:
    path = out / CONFIG_FILE
    fingerprint = config.fingerprint()
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != fingerprint:
            if not restart:
                changed = sorted(k for k in fingerprint.keys() | previous.keys() if previous.get(k) != fingerprint.get(k))
                raise RecoveryError(
                    f"{out} holds a benchmark with a different configuration (changed: {', '.join(changed)}). "
                    "Use another --out, or --restart to discard it. (Adding settings, methods or seeds is fine.)"
                )
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        _write_json(path, fingerprint)


def _write_json_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _dtype(config: RecoveryConfig):
    return jnp.bfloat16 if config.dtype == "bf16" else jnp.float32


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


def load_rows(out: Path, settings: Sequence[str] | None = None) -> list[dict]:
    """Every finished cell under `out` (dense, pruned, methods): `settings` (default: all found) in their order,
    methods in `METHODS` order, seeds ascending."""
    out = Path(out)
    rows = []
    if (out / "dense.json").exists():
        rows.append(json.loads((out / "dense.json").read_text()))
    folders = sorted(p for p in out.iterdir() if p.is_dir() and (p / "pruned.json").exists()) if out.exists() else []
    if settings is not None:
        by_slug = {p.name: p for p in folders}
        folders = [by_slug[setting_slug(s)] for s in settings if setting_slug(s) in by_slug]
    for folder in folders:
        rows.append(json.loads((folder / "pruned.json").read_text()))
        seed_dirs = sorted(folder.glob("seed*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else 0)
        for method in METHODS:
            for seed_dir in seed_dirs:
                path = seed_dir / f"{method}.json"
                if path.exists():
                    rows.append(json.loads(path.read_text()))
    return rows
