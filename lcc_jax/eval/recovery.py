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
zero-shot tasks, and the sparsity that survives the merge; each cell also keeps every chunk's NLL and
every document's 0/1 outcome, from which the table's paired-bootstrap intervals against the pruned
model and RestoreLCC are computed (`eval.bootstrap`). Each cell's result is written atomically
to `<setting>/seed<k>/<method>.json` and skipped when present, so a stopped run resumes. The methods
themselves are in `recovery_methods`; the table and charts in `recovery_table`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from lcc_jax.data.calibration import CalibrationConfig
from lcc_jax.errors import UserError
from lcc_jax.pruning.api import PruneConfig
from lcc_jax.restore.config import RestoreConfig

log = logging.getLogger(__name__)

METHODS = ("lora", "dora", "masked_lora", "lofit", "bias_only", "restorelcc", "restorelcc_recipe")
DEFAULT_METHODS = ("lora", "dora", "lofit", "restorelcc")
DEFAULT_SETTINGS = ("wanda:0.5", "sparsegpt:2:4", "flap:0.2")


class RecoveryError(UserError):
    """A benchmark that cannot run as asked."""


@dataclasses.dataclass(frozen=True)
class RecoveryConfig:
    """What the benchmark runs. `restore` is the shared training budget (samples, epochs, batch, lengths)."""

    settings: tuple[str, ...] = DEFAULT_SETTINGS  # "<method>:<sparsity or N:M>", "flap:<ratio>"
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds: mean ± std over them, intervals on their average
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


def run_recovery(source: str, out: Path, config: RecoveryConfig, *, mesh=None, restart: bool = False) -> dict:
    """Run (or resume) every cell; returns and writes `results.json` (and the table and charts)."""
    from lcc_jax.eval.recovery_methods import RUNNERS, Context
    from lcc_jax.eval.recovery_table import write_report
    from lcc_jax.convert.load import check_source
    from lcc_jax.restore.job_folder import claim

    out = Path(out)
    check_source(source)  # a typo'd model path is refused before --out is made
    claim(out, config.fingerprint(), restart)  # refuses a changed budget unless restart; lists may grow
    _dense_cell(source, out, config, mesh)
    for setting in config.settings:
        setting_dir = out / setting_slug(setting)
        contexts = [Context(source, setting_dir, setting, seed, config, mesh) for seed in config.seeds]
        if (setting_dir / "pruned.json").exists() and all(
                (ctx.out / f"{method}.json").exists() for ctx in contexts for method in config.methods):
            log.info("%s: every cell done already", setting)  # no pruning again for nothing
            continue
        _prune_cell(source, setting_dir, setting, config, mesh)
        for ctx in contexts:
            seed = ctx.seed
            for method in config.methods:
                path = ctx.out / f"{method}.json"
                if path.exists():
                    log.info("%s / seed %d / %s: done already", setting, seed, method)
                    continue
                log.info("%s / seed %d / %s ...", setting, seed, method)
                row = RUNNERS[method](ctx)
                write_json(path, {"setting": setting, "method": method, "seed": seed, **row})
                write_report(out, config)  # a table after every cell, so a stopped run shows what it has
    return write_report(out, config)


def _dense_cell(source: str, out: Path, config: RecoveryConfig, mesh) -> None:
    import lcc_jax
    from lcc_jax.eval.recovery_methods import export_audit, scores

    path = out / "dense.json"
    if path.exists():
        return
    model, tokenizer, _ = lcc_jax.load(source, dtype=compute_dtype(config), mesh=mesh)
    write_json(path, {"setting": "dense", "method": "dense", "seed": None, **scores(model, tokenizer, config, mesh),
                      **export_audit(model, None)})


def _prune_cell(source: str, setting_dir: Path, setting: str, config: RecoveryConfig, mesh) -> None:
    """Prune once per setting (saved as scripts/prune.py does) and score the pruned model."""
    import lcc_jax
    from lcc_jax.checkpoint import load_pruned, save_prune_result
    from lcc_jax.eval.recovery_methods import export_audit, scores
    from lcc_jax.pruning.api import prune

    pruned_dir = setting_dir / "pruned"
    prune_config = dataclasses.replace(parse_setting(setting), batch_size=config.prune_batch_size)
    if not pruned_dir.exists():
        model, tokenizer, _ = lcc_jax.load(source, dtype=compute_dtype(config), mesh=mesh)
        tokens = config.calibration.tokens(tokenizer) if prune_config.needs_calibration else None
        save_prune_result(pruned_dir, prune(model, tokens, prune_config, mesh=mesh), tokenizer, prune_config)
        del model
    path = setting_dir / "pruned.json"
    if not path.exists():
        checkpoint = load_pruned(pruned_dir, dtype=compute_dtype(config), mesh=mesh)
        write_json(path, {"setting": setting, "method": "pruned", "seed": None,
                          **scores(checkpoint.model, checkpoint.tokenizer, config, mesh),
                          **export_audit(checkpoint.model, checkpoint.masks),
                          "prune_seconds": checkpoint.meta.get("seconds")})


# ------------------------------------------------------------------------------------------ bookkeeping


def compute_dtype(config: RecoveryConfig):
    """The weights' dtype of every model the benchmark loads."""
    return jnp.bfloat16 if config.dtype == "bf16" else jnp.float32


def write_json(path: Path, value: Any) -> None:
    """Atomically (`restore.job_folder.write_text`), creating the folder."""
    from lcc_jax.restore.job_folder import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(value, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value.item() if hasattr(value, "item") else str(value)


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
