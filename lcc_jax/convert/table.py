"""The Hugging Face <-> NNX name table for the Llama family, used in both directions.

Each row maps a HF tensor name pattern to an NNX parameter path and a named transform. Rows whose HF
name holds `{layer}` address one slice of a stacked (layers, ...) NNX parameter. Import applies the
transform, export applies its inverse, so a round trip cannot drift.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import numpy as np

from lcc_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Row:
    hf: str  # e.g. "model.layers.{layer}.self_attn.q_proj.weight"
    nnx: str  # e.g. "layers.attn.q_proj.kernel"
    transform: str  # "transpose" (HF Linear (out, in) <-> Flax kernel (in, out)) or "identity"

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.hf

    def hf_name(self, layer: int | None = None) -> str:
        return self.hf.format(layer=layer) if self.stacked else self.hf


def _linear(hf_module: str, nnx_module: str, *, bias: bool) -> list[Row]:
    rows = [Row(f"model.layers.{{layer}}.{hf_module}.weight", f"layers.{nnx_module}.kernel", "transpose")]
    if bias:
        rows.append(Row(f"model.layers.{{layer}}.{hf_module}.bias", f"layers.{nnx_module}.bias", "identity"))
    return rows


def rows_for(config: ModelConfig) -> list[Row]:
    """The table for one config: only the tensors this model actually has."""
    c = config
    rows = [Row("model.embed_tokens.weight", "embed.embedding", "identity")]
    for proj in ("q_proj", "k_proj", "v_proj"):
        rows += _linear(f"self_attn.{proj}", f"attn.{proj}", bias=c.qkv_bias)
    rows += _linear("self_attn.o_proj", "attn.o_proj", bias=c.o_bias)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rows += _linear(f"mlp.{proj}", f"mlp.{proj}", bias=c.mlp_bias)
    rows += [
        Row("model.layers.{layer}.input_layernorm.weight", "layers.input_norm.scale", "identity"),
        Row("model.layers.{layer}.post_attention_layernorm.weight", "layers.post_attn_norm.scale", "identity"),
    ]
    if c.qk_norm:
        rows += [
            Row("model.layers.{layer}.self_attn.q_norm.weight", "layers.attn.q_norm.scale", "identity"),
            Row("model.layers.{layer}.self_attn.k_norm.weight", "layers.attn.k_norm.scale", "identity"),
        ]
    rows.append(Row("model.norm.weight", "final_norm.scale", "identity"))
    if not c.tie_word_embeddings:
        rows.append(Row("lm_head.weight", "lm_head.kernel", "transpose"))
    return rows


def hf_names(config: ModelConfig) -> Iterator[tuple[str, Row, int | None]]:
    """Every HF tensor name the model needs, with its row and layer index."""
    for row in rows_for(config):
        for layer in range(config.num_layers) if row.stacked else (None,):
            yield row.hf_name(layer), row, layer


def to_nnx(array: np.ndarray, row: Row) -> np.ndarray:
    """HF tensor -> the NNX layout (one layer's slice for stacked rows)."""
    return array.T if row.transform == "transpose" else array


def to_hf(array: np.ndarray, row: Row) -> np.ndarray:
    """Inverse of `to_nnx`."""
    return array.T if row.transform == "transpose" else array


def hf_shape(nnx_shape: tuple[int, ...], row: Row) -> tuple[int, ...]:
    """The HF tensor shape for one NNX parameter (per layer for stacked rows)."""
    shape = nnx_shape[1:] if row.stacked else nnx_shape
    return tuple(reversed(shape)) if row.transform == "transpose" else tuple(shape)


_LAYER = re.compile(r"\.(\d+)\.")


def row_for_hf_name(config: ModelConfig, name: str) -> tuple[Row, int | None] | None:
    """Which row (and layer) a HF tensor name belongs to, or None when the model has no such tensor."""
    match = _LAYER.search(name)
    for row in rows_for(config):
        if row.stacked and match and row.hf_name(int(match.group(1))) == name:
            return row, int(match.group(1))
        if not row.stacked and row.hf == name:
            return row, None
    return None
