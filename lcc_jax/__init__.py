"""lcc_jax: restore pruned LLMs by Lost Component Compensation, in JAX and Flax NNX.

The verbs (`lcc_jax.api`): `load`, `prune`, `restore`, `evaluate`, `save_hf` / `save_orbax`, each with its config
(`PruneConfig`, `RestoreConfig`, `EvalConfig`) and result (`PruneResult`, `RestoreResult`, `EvalResult`).
The pruning methods live in `lcc_jax.pruning`, RestoreLCC's parts in `lcc_jax.restore` (which is also the verb).
"""

import importlib.abc
import sys
from typing import TYPE_CHECKING

from lcc_jax.config import ConfigError, ModelConfig, RopeConfig
from lcc_jax.convert import CheckpointError, ExportError, SourceError, load, save_hf, save_orbax
from lcc_jax.models import CausalLM, CausalLMOutput, last_token_positions
from lcc_jax import distributed
from lcc_jax.sharding import MeshSpec, make_mesh, shard_like, shard_model
from lcc_jax.api import EvalConfig, EvalResult, RestoreResult, evaluate, prune
from lcc_jax.data.calibration import CalibrationConfig
from lcc_jax.pruning.api import PruneConfig, PruneResult
from lcc_jax.restore.config import PRESETS, RestoreConfig, preset

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


class _MovedPruneImports(importlib.abc.MetaPathFinder):
    """`import lcc_jax.prune.<module>` fails naming the new path: the package became `lcc_jax.pruning` when its
    name became the verb. First on sys.meta_path, so a stale lcc_jax/prune/ folder (__pycache__ left by an
    update) cannot come back as an empty namespace package that shadows the verb."""

    def find_spec(self, name, path=None, target=None):
        if name == "lcc_jax.prune" or name.startswith("lcc_jax.prune."):
            raise ModuleNotFoundError(
                f"No module named {name!r}: lcc_jax.prune is now the verb lcc_jax.prune(model, tokens_or_tokenizer, "
                "...), and the pruning package is lcc_jax.pruning (e.g. from lcc_jax.pruning.masks import "
                "sparsity_report).", name=name)
        return None


if not any(type(finder).__name__ == _MovedPruneImports.__name__ for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedPruneImports())
