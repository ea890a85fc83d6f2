"""lcc_jax: restore pruned LLMs by Lost Component Compensation, in JAX and Flax NNX.

The verbs (`lcc_jax.api`): `load`, `prune`, `restore`, `evaluate`, `save_hf` / `save_orbax`, each with its config
(`PruneConfig`, `RestoreConfig`, `EvalConfig`) and result (`PruneResult`, `RestoreResult`, `EvalResult`);
`recover_lora` (`lcc_jax.baselines.recover`) is the masked-LoRA recovery, the strongest sparsity-keeping one measured.
The pruning methods live in `lcc_jax.pruning`, RestoreLCC's parts in `lcc_jax.restore` (which is also the verb).
"""

import importlib.abc
import sys
from typing import TYPE_CHECKING

from lcc_jax import distributed
from lcc_jax.api import EvalConfig, EvalResult, RestoreResult, evaluate, prune
from lcc_jax.baselines.recover import LoraRecovery, recover_lora
from lcc_jax.config import ConfigError, ModelConfig, RopeConfig
from lcc_jax.convert import CheckpointError, ExportError, SourceError, load, save_hf, save_orbax
from lcc_jax.data.calibration import CalibrationConfig
from lcc_jax.models import CausalLM, CausalLMOutput, last_token_positions
from lcc_jax.pruning.api import PruneConfig, PruneResult
from lcc_jax.restore.config import PRESETS, RestoreConfig, preset
from lcc_jax.sharding import MeshSpec, make_mesh, shard_like, shard_model

if TYPE_CHECKING:  # type checkers see the verb's signature
    from lcc_jax.api import restore
else:  # at run time the package is the verb (lcc_jax/restore/__init__.py), so lcc_jax.restore.<module> resolves
    from lcc_jax import restore

__version__ = "0.1.0"

__all__ = [
    "CalibrationConfig",
    "CausalLM",
    "CheckpointError",
    "EvalConfig",
    "EvalResult",
    "LoraRecovery",
    "ExportError",
    "PRESETS",
    "PruneConfig",
    "PruneResult",
    "RestoreConfig",
    "RestoreResult",
    "SourceError",
    "distributed",
    "evaluate",
    "load",
    "preset",
    "prune",
    "recover_lora",
    "restore",
    "save_hf",
    "save_orbax",
    "CausalLMOutput",
    "ConfigError",
    "MeshSpec",
    "ModelConfig",
    "RopeConfig",
    "last_token_positions",
    "make_mesh",
    "shard_like",
    "shard_model",
]


# Modules that moved, and where to: importing the old path fails naming the new one.
_MOVED = {
    "lcc_jax.prune": "the verb lcc_jax.prune(model, tokens_or_tokenizer, ...); the pruning package is lcc_jax.pruning "
                     "(e.g. from lcc_jax.pruning.masks import sparsity_report)",
    "lcc_jax.restore.train": "lcc_jax.train (from lcc_jax.train import TrainConfig, fit; the module: lcc_jax.train.trainer)",
    "lcc_jax.restore.train_steps": "lcc_jax.train.steps",
    "lcc_jax.restore.train_state": "lcc_jax.train.state",
    "lcc_jax.restore.train_config": "lcc_jax.train.config",
    "lcc_jax.restore.train_data": "lcc_jax.train.data (RestoreLCC's samples: lcc_jax.restore.steps.training_data; "
                                  "the trainer's budget: RestoreConfig.train_config())",
    "lcc_jax.restore.losses": "lcc_jax.train.losses",
    "lcc_jax.eval.recovery": "lcc_jax.benchmark (RecoveryConfig: lcc_jax.benchmark.config; run_recovery: "
                             "lcc_jax.benchmark.recovery)",
    "lcc_jax.eval.recovery_methods": "lcc_jax.benchmark.methods",
    "lcc_jax.eval.recovery_table": "lcc_jax.benchmark.table",
    "lcc_jax.eval.plots": "lcc_jax.benchmark.plots",
}


class _MovedModules(importlib.abc.MetaPathFinder):
    """`import <a moved module>` fails naming its new path (`_MOVED`). First on sys.meta_path, so a stale folder
    of an old layout (lcc_jax/prune/ with only __pycache__ left by an update) cannot come back as an empty
    namespace package that shadows the verb lcc_jax.prune."""

    def find_spec(self, name, path=None, target=None):
        for old, new in _MOVED.items():
            if name == old or name.startswith(old + "."):
                raise ModuleNotFoundError(f"No module named {name!r}: {old} is now {new}.", name=name)
        return None


sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ not in ("_MovedPruneImports", "_MovedModules")]
sys.meta_path.insert(0, _MovedModules())
