"""Orbax save/restore of a pruned model with its masks and metadata, as one atomic folder.

    folder/
      model/      save_orbax: config.json, tokenizer files, params/ (Orbax)
      masks/      Orbax: {param path: bool (layers, in, out)}, True = keep (absent for structured pruning)
      head_map.npy  structured pruning: (layers, H') dense head index of each kept head
      meta.json   what was done (method, sparsity, calibration, timings, sparsity report)

The folder appears only when everything is written (staging folder, then rename), so an interrupted
save never leaves a half-finished result and never replaces a finished one unless asked.

Orbax stores every array with its global shape, so a folder saved from one mesh restores onto any
other (8 devices to 1, 1 to 8, one process to several): `load_pruned(..., mesh=)` places each array
by the target mesh's sharding table. With several processes every process calls `save_pruned`
(each writes its own shards) and process 0 writes the small files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from lcc_jax.convert.export import save_orbax, staging_folder
from lcc_jax.convert.load import SourceError, load
from lcc_jax.distributed import is_primary
from lcc_jax.models.llama import CausalLM
from lcc_jax.pruning.masks import sparsity_report
from lcc_jax.sharding import flat_params

META_FILE = "meta.json"


@dataclasses.dataclass
class PrunedCheckpoint:
    model: CausalLM
    tokenizer: Any
    masks: dict[str, jax.Array]
    head_map: np.ndarray | None
    meta: dict[str, Any]


def save_pruned(
    folder: str | Path,
    model: CausalLM,
    tokenizer,
    masks: dict[str, jax.Array],
    *,
    head_map: np.ndarray | None = None,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write model, masks, head map and metadata into `folder` at once (refuses a non-empty one unless `overwrite`)."""
    with staging_folder(folder, overwrite=overwrite) as tmp:
        save_orbax(model, tokenizer, tmp / "model")
        if masks:
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save((tmp / "masks").absolute(), _nest(masks))
            checkpointer.wait_until_finished()
            checkpointer.close()
        if is_primary():
            if head_map is not None:
                np.save(tmp / "head_map.npy", np.asarray(head_map))
            (tmp / META_FILE).write_text(json.dumps(meta or {}, indent=2, default=_jsonable) + "\n")
    return Path(folder)


def save_prune_result(folder: str | Path, result, tokenizer, config, **meta: Any) -> Path:
    """Save a `prune.api.PruneResult` with the metadata every stage reads back: the pruning config, its
    seconds, the total sparsity (None for structured pruning) and the pruned model's HF config (+ `meta`)."""
    report = sparsity_report(result.model) if result.masks else None
    meta = {"prune": config, "seconds": result.seconds, "sparsity_total": report.total if report else None,
            "config": result.model.config.to_hf(), **meta}
    return save_pruned(folder, result.model, tokenizer, result.masks, head_map=result.head_map, meta=meta)


def load_pruned(folder: str | Path, *, dtype=jnp.float32, mesh: Mesh | None = None) -> PrunedCheckpoint:
    """Restore model, tokenizer and masks, each placed with its weight's sharding on `mesh`."""
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        raise SourceError(f"{folder} is not a pruned checkpoint (no {META_FILE}); run scripts/prune.py first.")
    model, tokenizer, _ = load(folder / "model", dtype=dtype, mesh=mesh)
    masks: dict[str, jax.Array] = {}
    if (folder / "masks").is_dir():
        params = flat_params(model)
        checkpointer = ocp.StandardCheckpointer()
        stored = checkpointer.metadata((folder / "masks").absolute()).item_metadata.tree
        target = {}
        for path in _flatten_keys(stored):
            ref = params[path][...]
            target[path] = jax.ShapeDtypeStruct(tuple(ref.shape), jnp.bool_, sharding=ref.sharding)
        restored = checkpointer.restore((folder / "masks").absolute(), _nest(target))
        checkpointer.close()
        masks = {path: _get(restored, path) for path in target}
    head_map = np.load(folder / "head_map.npy") if (folder / "head_map.npy").is_file() else None
    meta = json.loads((folder / META_FILE).read_text())
    return PrunedCheckpoint(model, tokenizer, masks, head_map, meta)


def _nest(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _flatten_keys(tree, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [prefix]
    return [p for key, sub in tree.items() for p in _flatten_keys(sub, f"{prefix}.{key}" if prefix else key)]


def _get(tree, path: str):
    for key in path.split("."):
        tree = tree[key]
    return tree


def _jsonable(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)
