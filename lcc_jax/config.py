"""Model configuration: one frozen dataclass for the Llama family, read from and written to HF `config.json`.

Both transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`) layouts are read.
Anything we do not implement is refused with a `ConfigError`, never approximated.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lcc_jax.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class ConfigError(UserError):
    """A config.json we cannot represent exactly."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base frequency and optional scaling (`linear` or `llama3`)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def to_hf(self) -> dict[str, Any]:
        params: dict[str, Any] = {"rope_type": self.type, "rope_theta": self.theta}
        if self.type in ("linear", "llama3"):
            params["factor"] = self.factor
        if self.type == "llama3":
            params.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return params


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of a Llama-family decoder (Llama 1/2/3, Mistral, Qwen2, Qwen3, SmolLM2)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (always), Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias; where the folded compensation lives
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None  # Mistral v0.1
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; lcc_jax implements "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (SmolLM2 is 'llama')."
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}."
            )
        if self.rope.type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"RoPE scaling type {self.rope.type!r} is not implemented ({SUPPORTED_ROPE_TYPES}).")

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def total_heads(self) -> int:
        """L·H: the number of attention heads RestoreLCC ranks."""
        return self.num_layers * self.num_heads

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict (transformers 4.x or 5.x layout)."""
        model_type = hf.get("model_type")
        if model_type is None:
            raise ConfigError("config.json has no 'model_type'; is this a Hugging Face causal-LM config?")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported; lcc_jax implements "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (SmolLM2 is 'llama')."
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ConfigError(f"config.json lacks required field(s) {missing} for model_type {model_type!r}.")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act {act!r} is not supported (only 'silu').")
        if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ConfigError("partial_rotary_factor != 1 is not supported.")
        if model_type in ("qwen2", "qwen3") and (
            hf.get("use_sliding_window", False)
            or any(t != "full_attention" for t in hf.get("layer_types") or ())
        ):
            raise ConfigError(
                f"{model_type} with use_sliding_window=true (or sliding layer_types) is not supported; "
                "set it to false if unused."
            )

        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // num_heads
        attention_bias = bool(hf.get("attention_bias", False))
        # Qwen2 always has q/k/v biases and no o_proj bias; the others share one switch.
        qkv_bias, o_bias = (True, False) if model_type == "qwen2" else (attention_bias, attention_bias)
        window = hf.get("sliding_window") if model_type == "mistral" else None
        eos = hf.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=int(window) if window else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers (4.x and 5.x) loads as this exact model."""
        if self.model_type == "qwen2" and (not self.qkv_bias or self.o_bias):
            raise ConfigError(
                "Qwen2 in transformers always has q/k/v biases and no o_proj bias; this config "
                f"(qkv_bias={self.qkv_bias}, o_bias={self.o_bias}) cannot be written as qwen2."
            )
        if self.model_type in ("llama", "qwen3") and self.qkv_bias != self.o_bias:
            raise ConfigError(
                f"{self.model_type} has one attention_bias switch for q, k, v and o; this config has "
                f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}. Store zero q/k/v biases to export an o_proj bias."
            )
        if self.model_type == "mistral" and (self.qkv_bias or self.o_bias):
            raise ConfigError("Mistral in transformers has no attention biases; export as model_type 'llama' instead.")
        rope = self.rope.to_hf()
        hf: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            # Both layouts, so that transformers 4.x and 5.x read the same RoPE.
            "rope_theta": self.rope.theta,
            "rope_scaling": None if self.rope.type == "default" else rope,
            "rope_parameters": rope,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type in ("llama", "qwen3"):
            hf["attention_bias"] = self.o_bias
        if self.model_type == "llama":
            hf["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            hf.update(use_sliding_window=False, sliding_window=None)
        return hf

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{path} does not exist; a Hugging Face model folder needs a config.json.") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-download or fix the file.") from e
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} holds a JSON {type(hf).__name__}, not an object.")
        return cls.from_hf(hf)


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    params = hf.get("rope_parameters")
    if params is None:  # transformers 4.x layout
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"RoPE scaling type {rope_type!r} is not implemented (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
            "lcc_jax refuses rather than silently ignore it."
        )
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if "factor" not in params:
        raise ConfigError(f"RoPE scaling {rope_type!r} needs a 'factor'.")
    if rope_type == "linear":
        return RopeConfig(theta=theta, type="linear", factor=float(params["factor"]))
    return RopeConfig(
        theta=theta,
        type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )
