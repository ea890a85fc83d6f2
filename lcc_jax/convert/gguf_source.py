"""A TensorSource over a llama.cpp GGUF file, presented with Hugging Face names and layouts.

Three things differ from a HF checkpoint, and each is undone here:
  * names: `blk.3.attn_q.weight` is `model.layers.3.self_attn.q_proj.weight`;
  * shapes: GGUF lists dimensions fastest-first (ggml `ne`), the reverse of numpy/PyTorch order;
  * q/k rows: for the `llama` architecture, llama.cpp's converter reorders each head's q and k rows
    from rotate-half pairs (i, i + d/2) to interleaved pairs (2i, 2i + 1); `unpermute_rows` restores
    HF's order, so head (l, h) and RoPE mean what they mean in `transformers`. qwen2/qwen3 files are
    not permuted.
Quantized tensors (Q4_1, Q8_0, K-quants, ...) are dequantized to float32 with `gguf.quants`, one
tensor at a time; the file itself stays memory-mapped. The header is parsed here rather than with
`gguf.GGUFReader`, which builds a numpy view per metadata item: 6-35 s for a 49k-token vocabulary on
2 CPU cores, against ~0.1 s here (tests check both agree).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import mmap
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from lcc_jax.config import ConfigError
from lcc_jax.convert.assign import CheckpointError

log = logging.getLogger(__name__)

GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_PERMUTED_ARCHITECTURES = ("llama",)  # convert_hf_to_gguf.py's LlamaModel permutes q/k; Qwen's do not

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_MODULES = {  # llama.cpp module in blk.N -> HF module in model.layers.N
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    """The HF name of a GGUF tensor; names we do not know are returned unchanged (and later reported)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_MODULES:
        layer, module, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK_MODULES[module]}.{kind}"
    return gguf_name


def unpermute_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation over the first (output) axis.

    Per head, llama.cpp stores HF row `c * d/2 + i` (c in {0, 1}, i < d/2) at row `2 * i + c`;
    this reads it back. Works for weights (heads*d, in) and biases (heads*d,).
    """
    out_dim = rows.shape[0]
    half = out_dim // num_heads // 2
    return rows.reshape(num_heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


class GGUFSource:
    """Lazy, read-only access to a GGUF file under HF names (satisfies `TensorSource`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.metadata, infos = read_header(self.path)
        except CheckpointError:
            raise
        except (ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
            raise CheckpointError(
                str(self.path), [f"cannot read the GGUF file: {e}. It is corrupt, truncated, or not GGUF."]
            ) from e
        _check_quant_types(self.path, infos)  # from the header alone, before a single tensor is read
        self.architecture = str(self.metadata.get("general.architecture", ""))
        self._tensors = {hf_name(t.name): t for t in infos}
        self.gguf_names = [t.name for t in infos]
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r") if infos else None

    # ---------------------------------------------------------------- TensorSource

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(reversed(self._tensors[name].ne))  # ggml ne order (fastest first) -> numpy order

    def get(self, name: str) -> np.ndarray:
        info = self._tensors[name]
        raw = self._data[info.offset : info.offset + info.nbytes].reshape(*self.shape(name)[:-1], -1)  # bytes per row
        try:
            array = dequantize(raw, info.ggml_type).reshape(self.shape(name))
        except Exception as e:
            problem = f"cannot decode tensor {info.name!r} ({info.ggml_type.name}): {e}"
            raise CheckpointError(str(self.path), [problem]) from e
        if self.architecture in _PERMUTED_ARCHITECTURES:
            if re.fullmatch(r"model\.layers\.\d+\.self_attn\.q_proj\.(weight|bias)", name):
                array = unpermute_rows(array, self._int("attention.head_count"))
            elif re.fullmatch(r"model\.layers\.\d+\.self_attn\.k_proj\.(weight|bias)", name):
                heads = self._int("attention.head_count")
                array = unpermute_rows(array, self._int("attention.head_count_kv", heads))
        return array

    def __str__(self) -> str:
        return str(self.path)

    # ---------------------------------------------------------------- config

    def hf_config(self) -> dict[str, Any]:
        """A HF `config.json` dict built from the GGUF metadata (`{arch}.*` and `tokenizer.ggml.*` keys)."""
        arch = self.architecture
        if arch not in GGUF_ARCHITECTURES:
            raise ConfigError(
                f"{self.path.name}: GGUF architecture {arch!r} is not supported; lcc_jax reads "
                f"{', '.join(GGUF_ARCHITECTURES)} GGUF files."
            )
        required = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
        missing = [f"{arch}.{k}" for k in required if f"{arch}.{k}" not in self.metadata]
        if missing:
            raise ConfigError(f"{self.path.name}: GGUF metadata lacks {missing}; the file is incomplete.")
        if "rope_freqs.weight" in self._tensors:
            raise ConfigError(
                f"{self.path.name} stores precomputed RoPE frequency factors (rope_freqs.weight, from "
                "Llama-3.1-style rope scaling); their exact scaling parameters cannot be recovered from a GGUF. "
                "Load the original Hugging Face folder instead."
            )
        hidden = self._int("embedding_length")
        heads = self._int("attention.head_count")
        head_dim = self._int("attention.key_length", hidden // heads)
        if self._int("attention.value_length", head_dim) != head_dim:
            raise ConfigError(f"{self.path.name}: key and value head sizes differ; not a Llama-family model.")
        if self._int("rope.dimension_count", head_dim) != head_dim:
            raise ConfigError(f"{self.path.name}: RoPE covers part of each head (partial rotary); not supported.")
        embed = "model.embed_tokens.weight"  # its rows are the vocabulary, whatever the metadata says
        vocab = self.shape(embed)[0] if embed in self._tensors else self._int("vocab_size")
        layer0 = "model.layers.0."
        hf: dict[str, Any] = {
            "model_type": arch,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self._int("feed_forward_length"),
            "num_hidden_layers": self._int("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._int("attention.head_count_kv", heads),
            "head_dim": head_dim,
            "rms_norm_eps": self._float("attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": self._float("rope.freq_base", 10000.0),
            "max_position_embeddings": self._int("context_length", 4096),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "hidden_act": "silu",
            "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.metadata.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.metadata.get("tokenizer.ggml.padding_token_id"),
        }
        if arch == "llama":
            hf["attention_bias"] = layer0 + "self_attn.o_proj.bias" in self._tensors
            hf["mlp_bias"] = layer0 + "mlp.gate_proj.bias" in self._tensors
            window = self.metadata.get(f"{arch}.attention.sliding_window")
            if window:  # Mistral v0.1 is stored as llama with a window
                hf.update(model_type="mistral", sliding_window=int(window))
        scaling = str(self.metadata.get(f"{arch}.rope.scaling.type", "none"))
        if scaling == "linear":
            hf["rope_scaling"] = {"rope_type": "linear", "factor": self._float("rope.scaling.factor")}
        elif scaling != "none":
            raise ConfigError(f"{self.path.name}: RoPE scaling {scaling!r} is not implemented (only linear).")
        return hf

    def _int(self, key: str, default: int | None = None) -> int:
        value = self.metadata.get(f"{self.architecture}.{key}", default)
        if value is None:
            raise ConfigError(f"{self.path.name}: GGUF metadata lacks {self.architecture}.{key}.")
        return int(value)

    def _float(self, key: str, default: float | None = None) -> float:
        value = self.metadata.get(f"{self.architecture}.{key}", default)
        if value is None:
            raise ConfigError(f"{self.path.name}: GGUF metadata lacks {self.architecture}.{key}.")
        # GGUF stores float32: 1e-5 reads back as 9.99999974e-06; keep the shortest decimal that float32 rounds to.
        return float(str(np.float32(value)))


def decodable_types() -> list[str]:
    """The ggml tensor types the installed `gguf` package can dequantize (F32, F16 and its `gguf.quants`)."""
    from gguf.quants import _type_traits  # private to gguf: imported here, so a rename breaks only this list

    return [t.name for t in GGMLQuantizationType if t in _type_traits or t.name in ("F32", "F16")]


def _check_quant_types(path: Path, infos: list[TensorInfo]) -> None:
    """Refuse a file holding tensors of a type we cannot dequantize, naming the type and what we can read."""
    known = set(decodable_types())
    by_type: dict[str, list[str]] = {}
    for info in infos:
        if info.ggml_type.name not in known:
            by_type.setdefault(info.ggml_type.name, []).append(info.name)
    if by_type:
        problems = [f"{len(names)} tensor(s) of type {kind} (e.g. {names[0]!r}), which lcc_jax cannot dequantize"
                    for kind, names in sorted(by_type.items())]
        problems[-1] += (f" (it reads {', '.join(sorted(known))}): convert the model to one of those (e.g. with "
                         "llama.cpp's llama-quantize to Q8_0), or load its Hugging Face folder instead")
        raise CheckpointError(str(path), problems)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml dimension order: fastest-varying first
    ggml_type: Any  # gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """(metadata, tensor infos) of a little-endian GGUF v2/v3 file."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        reader = _Reader(buf)
        if buf[:4] != b"GGUF":
            raise ValueError("no GGUF magic at the start")
        reader.pos = 4
        version = reader.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (byte-swapped or unknown; only little-endian v2/v3 is read)")
        tensor_count, kv_count = reader.unpack("<Q"), reader.unpack("<Q")
        metadata = {}
        for _ in range(kv_count):
            key = reader.string()
            metadata[key] = reader.value(reader.unpack("<I"))
        raw = []
        for _ in range(tensor_count):
            name = reader.string()
            ne = tuple(reader.unpack("<Q") for _ in range(reader.unpack("<I")))
            raw.append((name, ne, reader.unpack("<I"), reader.unpack("<Q")))
        alignment = int(metadata.get("general.alignment", 32))
        start = -(-reader.pos // alignment) * alignment
        infos = []
        for name, ne, kind, offset in raw:
            if kind not in GGMLQuantizationType._value2member_map_:
                raise CheckpointError(str(path), [
                    f"tensor {name!r} has ggml type number {kind}, unknown to the installed gguf package "
                    f"({importlib.metadata.version('gguf')}): the file is newer than it, or corrupt. Try `pip install -U gguf`, or "
                    "convert the model to Q8_0 or F16 with llama.cpp"])
            ggml_type = GGMLQuantizationType(kind)
            block, size = GGML_QUANT_SIZES[ggml_type]
            nbytes = int(np.prod(ne, dtype=np.int64)) // block * size
            if start + offset + nbytes > len(buf):
                raise ValueError(f"tensor {name!r} runs past the end of the file (truncated download?)")
            infos.append(TensorInfo(name, ne, ggml_type, start + offset, nbytes))
    return metadata, infos


class _Reader:
    """Sequential little-endian reads from a buffer."""

    # GGUF value type -> struct format / numpy dtype (8 is a string, 9 an array)
    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    _NUMPY = {k: np.dtype(np.bool_ if v == "<?" else v) for k, v in _SCALARS.items()}
    _STRING, _ARRAY = 8, 9

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        text = bytes(self.buf[self.pos : self.pos + length]).decode("utf-8")
        self.pos += length
        return text

    def value(self, kind: int) -> Any:
        if kind == self._STRING:
            return self.string()
        if kind in self._SCALARS:
            return self.unpack(self._SCALARS[kind])
        if kind != self._ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        item, count = self.unpack("<I"), self.unpack("<Q")
        if item in self._NUMPY:  # numeric arrays in one read
            array = np.frombuffer(self.buf, self._NUMPY[item], count, self.pos)
            self.pos += array.nbytes
            return array.tolist()
        return [self.value(item) for _ in range(count)]
