"""A TensorSource over a Hugging Face folder: one `model.safetensors`, or shards listed in
`model.safetensors.index.json`.

Files are opened once (memory-mapped by `safetensors`) and each tensor is read only when asked for,
so a sharded 70B checkpoint costs one tensor of host memory at a time. bf16 tensors come back as
`ml_dtypes.bfloat16` numpy arrays.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from safetensors import safe_open

from lcc_jax.convert.assign import CheckpointError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsSource:
    """Lazy, read-only access to the tensors of a HF model folder (satisfies `TensorSource`)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._files = _weight_map(self.folder)  # tensor name -> file name
        self._handles: dict[str, object] = {}
        problems = []
        for file in sorted(set(self._files.values())):
            try:
                self._handles[file] = _open(self.folder / file)
            except Exception as e:  # safetensors raises its own error type for bad headers
                problems.append(
                    f"cannot read {file}: {e}. The file is corrupt or truncated; download or export it again."
                )
        if problems:
            raise CheckpointError(str(self.folder), problems)
        stored = {file: set(handle.keys()) for file, handle in self._handles.items()}
        missing = [name for name, file in self._files.items() if name not in stored[file]]
        if missing:
            raise CheckpointError(
                str(self.folder),
                [f"{INDEX_FILE} lists {n!r} in {self._files[n]}, which does not contain it" for n in missing[:20]],
            )

    def names(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._files[name]].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        handle = self._handles[self._files[name]]
        try:
            return handle.get_tensor(name)
        except Exception as e:
            if self.dtype(name) == "BF16":  # safetensors < 0.5 has no numpy bf16: read through JAX
                return _read_bf16_via_flax(self.folder / self._files[name], name)
            raise CheckpointError(
                str(self.folder), [f"cannot read tensor {name!r} from {self._files[name]}: {e}"]
            ) from e

    def dtype(self, name: str) -> str:
        """The stored dtype as safetensors spells it ('F32', 'BF16', ...)."""
        return self._handles[self._files[name]].get_slice(name).get_dtype()

    def __str__(self) -> str:
        return str(self.folder)


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(
                str(folder), [f"{INDEX_FILE} is not a valid safetensors index ({e}); download it again."]
            ) from e
        absent = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if absent:
            problems = [f"{INDEX_FILE} names shard {f}, which is not in the folder" for f in absent]
            raise CheckpointError(str(folder), problems)
        return dict(weight_map)
    if (folder / SINGLE_FILE).is_file():
        handle = _open_or_raise(folder, SINGLE_FILE)
        return {name: SINGLE_FILE for name in handle.keys()}
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors", ".gguf"))
    hint = ""
    if any(o.endswith((".bin", ".pt", ".pth")) for o in others):
        hint = (
            " It holds PyTorch pickles; re-save them as safetensors with transformers "
            "(`model.save_pretrained(dir, safe_serialization=True)`)."
        )
    elif any(o.endswith(".gguf") for o in others):
        hint = " It holds a .gguf file; pass that file instead of the folder."
    raise CheckpointError(
        str(folder),
        [f"no {SINGLE_FILE} or {INDEX_FILE} in the folder (found: {others or 'no weight files'}).{hint}"],
    )


def _open_or_raise(folder: Path, file: str):
    try:
        return _open(folder / file)
    except Exception as e:
        raise CheckpointError(
            str(folder), [f"cannot read {file}: {e}. The file is corrupt or truncated; download or export it again."]
        ) from e


def _open(path: Path):
    return safe_open(str(path), framework="numpy")


def _read_bf16_via_flax(path: Path, name: str) -> np.ndarray:
    with safe_open(str(path), framework="flax") as f:
        return np.asarray(f.get_tensor(name))
