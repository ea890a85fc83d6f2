"""Write models out: Hugging Face folders (config.json + safetensors + tokenizer) and Orbax folders.

Safetensors are streamed: the header is planned from the tensor shapes up front, then each tensor
is written as it is produced, so exporting never holds a second copy of the model in host memory.
Every export is written into a hidden sibling folder and renamed into place at the end, so a
failure (or Ctrl-C) never leaves a half-written model behind.

With several JAX processes every process calls the same function: they share one staging folder
(process 0 creates and promotes it), Orbax writes each process's shards, and only process 0 writes
the small files and the safetensors (the other processes take part in gathering the tensors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import re
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lcc_jax.config import ModelConfig
from lcc_jax.convert.assign import TensorSource, abstract_model, check_source, hf_tensors
from lcc_jax.convert.table import hf_names, hf_shape
from lcc_jax.distributed import barrier, broadcast, is_primary, multi_process
from lcc_jax.errors import UserError, disk_full, is_disk_full
from lcc_jax.models import CausalLM
from lcc_jax.sharding import flat_params
from lcc_jax.signals import critical

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"
ORBAX_PARAMS_DIR = "params"  # an Orbax folder is config.json + params/ (+ tokenizer files)
FORMAT_FILE = "lcc_jax_format.json"

_ST_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64",
}
_DTYPE_NAMES = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
}


class ExportError(UserError):
    """An export that would destroy data or cannot be written."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


# ------------------------------------------------------------------------------ public API


def save_hf(
    model: CausalLM,
    tokenizer,
    folder: str | Path,
    *,
    overwrite: bool = False,
    dtype=None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write `model` (and `tokenizer`, if given) as a HF folder that `transformers` loads directly.

    Tied models get no `lm_head.weight`. `dtype` (default: the model's) casts tensor by tensor.
    Refuses a non-empty `folder` unless `overwrite=True`. Returns the folder.
    """
    params = flat_params(model)
    out_dtype = np.dtype(dtype) if dtype is not None else model_dtype(model)
    specs = [
        TensorSpec(name, hf_shape(tuple(params[row.nnx].shape), row), out_dtype)
        for name, row, _ in hf_names(model.config)
    ]
    tensors = ((name, array.astype(out_dtype, copy=False)) for name, array in hf_tensors(model))
    return _write_hf(
        model.config, specs, tensors, tokenizer, folder, overwrite=overwrite, max_shard_size=max_shard_size
    )


def save_source_hf(
    config: ModelConfig,
    source: TensorSource,
    tokenizer,
    folder: str | Path,
    *,
    overwrite: bool = False,
    dtype=np.float32,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write a TensorSource (e.g. a GGUF file) as a HF folder without building a JAX model."""
    check_source(config, abstract_model(config), source)
    out_dtype = np.dtype(dtype)
    names = [name for name, _, _ in hf_names(config)]
    specs = [TensorSpec(name, tuple(source.shape(name)), out_dtype) for name in names]
    tensors = ((name, np.asarray(source.get(name)).astype(out_dtype, copy=False)) for name in names)
    return _write_hf(config, specs, tensors, tokenizer, folder, overwrite=overwrite, max_shard_size=max_shard_size)


def save_orbax(model: CausalLM, tokenizer, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write the model's NNX Params with Orbax (`folder/params`), its config.json and tokenizer beside it.

    `lcc_jax.load(folder)` restores it straight into any mesh's shardings.
    """
    with staging_folder(folder, overwrite=overwrite) as tmp:
        if is_primary():
            write_config(tmp, model.config, model_dtype(model))
            (tmp / FORMAT_FILE).write_text(json.dumps({"format": "orbax", "params": ORBAX_PARAMS_DIR}, indent=2) + "\n")
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        checkpointer = ocp.StandardCheckpointer()  # every process writes the shards it holds
        checkpointer.save((tmp / ORBAX_PARAMS_DIR).absolute(), nnx.state(model, nnx.Param).to_pure_dict())
        checkpointer.wait_until_finished()
        checkpointer.close()
    log.info("wrote Orbax checkpoint %s", folder)
    return Path(folder)


def model_dtype(model: CausalLM) -> np.dtype:
    """The parameter dtype (all parameters share it)."""
    return np.dtype(jnp.dtype(flat_params(model)["embed.embedding"].dtype))


def write_config(folder: Path, config: ModelConfig, dtype: np.dtype) -> None:
    """config.json from `config.to_hf()`, with the stored dtype under both transformers 4.x and 5.x keys and
    the installed transformers' version, which its own `save_pretrained` records.

    The version keeps the tokenizer saved beside it loading quietly. transformers from 4.57.3 until its fix
    (huggingface/transformers#44031, #45444; 5.17 still has it) takes any local tokenizer of over 100,000
    tokens whose config.json lacks `transformers_version` for one carrying Mistral's broken split regex and
    warns "incorrect regex pattern ... set fix_mistral_regex=True" on every load: a Qwen2 checkpoint, whose
    regex is right, and which that flag would give Mistral's. A version of 5.0 or later passes that check.
    """
    hf: dict[str, Any] = config.to_hf()
    name = _DTYPE_NAMES.get(np.dtype(dtype), str(np.dtype(dtype)))
    hf.update(torch_dtype=name, dtype=name)
    version = _transformers_version()
    if version is not None:
        hf["transformers_version"] = version
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


def _transformers_version() -> str | None:
    """The installed transformers' version (read from its metadata, without importing it), or None."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def write_safetensors(
    folder: Path,
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> list[str]:
    """Stream `tensors` (in `specs` order) into model.safetensors, or shards plus an index.

    Returns the file names written.
    """
    shards = plan_shards(specs, parse_size(max_shard_size))
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    stream = iter(tensors)
    for file, shard in zip(files, shards):
        with open(folder / file, "wb") as f:
            f.write(_header(shard))
            for spec in shard:
                name, array = next(stream)
                array = np.ascontiguousarray(array)
                if name != spec.name or tuple(array.shape) != spec.shape or array.dtype != spec.dtype:
                    raise ExportError(
                        f"tensor stream out of step with its plan: got {name} {array.shape} {array.dtype}, "
                        f"expected {spec.name} {spec.shape} {spec.dtype}"
                    )
                f.write(array.reshape(-1).view(np.uint8).data)
    if next(stream, None) is not None:
        raise ExportError("more tensors than planned")
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {spec.name: file for file, shard in zip(files, shards) for spec in shard},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most `max_bytes` each (a single larger tensor gets its own shard)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000; ints pass through."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?", size.strip().lower())
    if not match:
        raise ExportError(f"cannot read size {size!r} (--max-shard-size); use bytes or e.g. '5GB', '500MB', '2GiB'.")
    number, unit, binary = match.groups()
    power = "kmgt".index(unit) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


@contextlib.contextmanager
def staging_folder(folder: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty hidden sibling of `folder`; on success it replaces `folder`, on failure it is removed
    (out of disk space, the error becomes `errors.DiskFull`, naming `folder`).

    The swap into place cannot be cut in half by SIGINT / SIGTERM (`signals.critical`): `folder` is
    always either the old result or the new one. With several processes all of them must call this
    (collectively): they get the same staging folder, and process 0 creates, promotes or removes it.
    """
    folder = Path(folder).expanduser().absolute()
    check_writable(folder, overwrite=overwrite)
    tmp = folder.parent / f".{folder.name}.partial-{_staging_tag()}"
    if is_primary():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    barrier(f"lcc_jax staging {tmp}")
    try:
        yield tmp
    except BaseException as e:
        if is_primary():
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise disk_full(folder, e) from e
        raise
    barrier(f"lcc_jax written {tmp}")  # every process's shards are in
    if is_primary():
        old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        with critical():
            if folder.exists():
                folder.rename(old)
            tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    barrier(f"lcc_jax promoted {folder}")


def _staging_tag() -> str:
    """A random suffix for a staging folder, the same on every process."""
    if not multi_process():
        return uuid.uuid4().hex[:8]
    draw = np.asarray(uuid.uuid4().int % (1 << 31), np.int32)
    return f"{int(broadcast(draw)):08x}"


def check_writable(folder: Path, *, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder} is a file; choose a folder path to export into.")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ExportError(
            f"{folder} already exists and is not empty; choose a new folder, or pass overwrite=True "
            "(--overwrite on the command line) to replace it."
        )


# ------------------------------------------------------------------------------ internals


def _write_hf(config, specs, tensors, tokenizer, folder, *, overwrite, max_shard_size) -> Path:
    with staging_folder(folder, overwrite=overwrite) as tmp:
        if not is_primary():
            for _ in tensors:  # gathering a tensor sharded over processes needs every process
                pass
            return Path(folder)
        write_config(tmp, config, specs[0].dtype)
        files = write_safetensors(tmp, specs, tensors, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    total = sum(s.nbytes for s in specs)
    log.info("wrote %s: %d tensors, %.1f MB in %d file(s)", folder, len(specs), total / 1e6, len(files))
    return Path(folder)


def _header(shard: list[TensorSpec]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        if spec.dtype not in _ST_DTYPES:
            raise ExportError(f"{spec.name}: dtype {spec.dtype} cannot be written to safetensors here.")
        header[spec.name] = {
            "dtype": _ST_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # align the data to 8 bytes, as the safetensors library does
    return struct.pack("<Q", len(text)) + text


