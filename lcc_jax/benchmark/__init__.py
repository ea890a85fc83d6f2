"""The recovery benchmark and the pictures, above the library: dense, pruned and every recovery method (LoRA,
DoRA, masked LoRA, LoFiT, bias-only, RestoreLCC) on the same pruned models, budget and data.

    config        RecoveryConfig: settings, methods, seeds, the shared RestoreLCC budget
    recovery      run_recovery: prune once per setting, run every (setting, seed, method) cell, resumable
    parts         one table split over GPUs or machines from one pruned base (link_base), merged back (merge_parts)
    methods       one runner per method, and how a model is scored as exported
    loaded        the dense model, tokenizer, pruned checkpoints and training data, read once per process
    cells         where each cell's JSON lives, and reading them back in order
    table         results.json, table.md (paired-bootstrap intervals, `eval.bootstrap`) and the bar charts
    plots         pictures of a restore run (head scores, lost-component energy, losses) and of the benchmark
"""

from lcc_jax.benchmark.config import DEFAULT_METHODS, DEFAULT_SETTINGS, METHODS, RecoveryConfig, RecoveryError
from lcc_jax.benchmark.recovery import run_recovery
from lcc_jax.benchmark.table import write_report

__all__ = ["DEFAULT_METHODS", "DEFAULT_SETTINGS", "METHODS", "RecoveryConfig", "RecoveryError", "run_recovery",
           "write_report"]
