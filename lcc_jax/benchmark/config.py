"""What the recovery benchmark runs: its settings, methods, seeds and shared budget (`RecoveryConfig`)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

from lcc_jax.data.calibration import CalibrationConfig
from lcc_jax.errors import UserError
from lcc_jax.pruning.api import PruneConfig
from lcc_jax.restore.config import RestoreConfig

METHODS = ("lora", "dora", "masked_lora", "lofit", "lofit_reference", "bias_only", "restorelcc", "restorelcc_recipe")
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


def compute_dtype(config: RecoveryConfig):
    """The weights' dtype of every model the benchmark loads."""
    return jnp.bfloat16 if config.dtype == "bf16" else jnp.float32
