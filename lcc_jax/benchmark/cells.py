"""Where the recovery benchmark keeps its cells: `<out>/dense.json`, `<out>/<setting>/pruned.json` and
`<out>/<setting>/seed<k>/<method>.json`, each written atomically, and how they are read back in order."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lcc_jax.benchmark.config import METHODS
from lcc_jax.restore.job_folder import write_text

# Pruned perplexities this close count as one checkpoint: Wanda 50 % of SmolLM2 re-pruned on another GPU scored
# 49.83824 against 49.83794 (6e-6); SparseGPT 2:4 re-pruned scored 109.42 against 111.27 (near-ties flipped).
SAME_PRUNE_TOLERANCE = 1e-3


def same_prune(ppl: float, other: float) -> bool:
    """Whether two pruned models' WikiText-2 perplexities say they are one checkpoint (`SAME_PRUNE_TOLERANCE`)."""
    return abs(ppl - other) <= SAME_PRUNE_TOLERANCE * abs(other)


def pruned_ppl(out: Path, setting: str) -> float | None:
    """The WikiText-2 perplexity of `setting`'s pruned model in a recovery or ablation folder (its pruned.json),
    or None where there is none: what `same_prune` compares before cells of two folders are paired."""
    try:
        return float(json.loads((Path(out) / setting_slug(setting) / "pruned.json").read_text())["ppl"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def setting_slug(setting: str) -> str:
    """A folder name for a setting: "sparsegpt:2:4" -> "sparsegpt-2of4"."""
    method, _, amount = setting.partition(":")
    return f"{method}-{amount.replace(':', 'of')}"


def write_json(path: Path, value: Any) -> None:
    """Atomically (`restore.job_folder.write_text`), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(value, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value.item() if hasattr(value, "item") else str(value)


def load_rows(out: Path, settings: Sequence[str] | None = None) -> list[dict]:
    """Every finished cell under `out` (dense, pruned, methods): `settings` (default: all found) in their order,
    methods in `METHODS` order, seeds ascending."""
    out = Path(out)
    rows = []
    if (out / "dense.json").exists():
        rows.append(json.loads((out / "dense.json").read_text()))
    folders = sorted(p for p in out.iterdir() if p.is_dir() and (p / "pruned.json").exists()) if out.exists() else []
    if settings is not None:
        by_slug = {p.name: p for p in folders}
        folders = [by_slug[setting_slug(s)] for s in settings if setting_slug(s) in by_slug]
    for folder in folders:
        rows.append(json.loads((folder / "pruned.json").read_text()))
        seed_dirs = sorted(folder.glob("seed*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else 0)
        for method in METHODS:
            for seed_dir in seed_dirs:
                path = seed_dir / f"{method}.json"
                if path.exists():
                    rows.append(json.loads(path.read_text()))
    return rows
