"""lcc_jax: restore pruned LLMs by Lost Component Compensation, in JAX and Flax NNX."""

from lcc_jax.config import ConfigError, ModelConfig, RopeConfig
from lcc_jax.convert import CheckpointError, ExportError, SourceError, load, save_hf, save_orbax
from lcc_jax.models import CausalLM, CausalLMOutput, last_token_positions
from lcc_jax import distributed
from lcc_jax.sharding import MeshSpec, make_mesh, shard_like, shard_model

__version__ = "0.1.0"

__all__ = [
    "CausalLM",
    "CheckpointError",
    "ExportError",
    "SourceError",
    "distributed",
    "load",
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
