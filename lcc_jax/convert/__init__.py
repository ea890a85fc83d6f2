"""Checkpoint import and export: HF safetensors folders, GGUF files, Orbax folders, built-in models."""

from lcc_jax.convert.assign import CheckpointError, DictSource, TensorSource, hf_tensors, model_from_source
from lcc_jax.convert.builtin import BUILTINS, BuiltinError, ensure_builtin, ensure_gguf
from lcc_jax.convert.export import ExportError, save_hf, save_orbax, save_source_hf
from lcc_jax.convert.gguf_source import GGUFSource
from lcc_jax.convert.load import SourceError, load, resolve
from lcc_jax.convert.reformat import convert
from lcc_jax.convert.safetensors_source import SafetensorsSource

__all__ = [
    "BUILTINS",
    "BuiltinError",
    "CheckpointError",
    "DictSource",
    "ExportError",
    "GGUFSource",
    "SafetensorsSource",
    "SourceError",
    "TensorSource",
    "convert",
    "ensure_builtin",
    "ensure_gguf",
    "hf_tensors",
    "load",
    "model_from_source",
    "resolve",
    "save_hf",
    "save_orbax",
    "save_source_hf",
]
