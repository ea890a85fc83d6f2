"""A recovery table split over several GPUs or machines, from one pruned base, and merged back.

    benchmark_recovery.py MODEL --out base --settings wanda:0.5,sparsegpt:2:4 --prune-only    # once
    benchmark_recovery.py MODEL --out part1 --settings wanda:0.5 --base base                    # GPU 1
    benchmark_recovery.py MODEL --out part2 --settings sparsegpt:2:4 --base base                # GPU 2
    benchmark_recovery.py MODEL --out all --settings wanda:0.5,sparsegpt:2:4 --merge-from part1,part2

Pruning runs once, so every part starts from the same mask (pruning again on another GPU can move it by
rounding). `link_base` hard-links the base's dense scores and each setting's pruned checkpoint and scores into a
part; `merge_parts` gathers the parts' cells into one folder, refusing two different results for one cell, and the
run that follows finds every cell done and writes the table.
"""

from __future__ import annotations

import filecmp
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from lcc_jax.benchmark.cells import setting_slug
from lcc_jax.benchmark.config import RecoveryError

log = logging.getLogger(__name__)

SHARED_TOP = ("dense.json",)  # of the files directly in a part, the only one merged: the rest (run.json, results.json,
# table.md, eta.json, charts) are each run's own report, written again by the merged run


def link_base(bases: Path | Sequence[Path], part: Path, settings: Sequence[str]) -> None:
    """Hard-link (copy where links are refused) the dense.json and each setting's pruned/ and pruned.json of
    `bases` (the first that has each) into `part`; what `part` has already is kept. A setting no base has pruned
    is an error. Parts that will be merged must take dense.json from the same base: list it first."""
    bases = [Path(bases)] if isinstance(bases, (str, Path)) else [Path(b) for b in bases]
    part = Path(part)

    def first(rel: str) -> Path | None:
        return next((b for b in bases if (b / rel).exists()), None)

    missing = [s for s in settings if first(f"{setting_slug(s)}/pruned.json") is None]
    if missing or first("dense.json") is None:
        where = ", ".join(map(str, bases))
        raise RecoveryError(
            f"--base {where} has no pruned checkpoint and scores for {', '.join(missing) or 'the dense model'}; run "
            f"benchmark_recovery.py --prune-only --out BASE --settings {','.join(missing or settings)} first.")
    part.mkdir(parents=True, exist_ok=True)
    _link(first("dense.json") / "dense.json", part / "dense.json")
    for setting in settings:
        slug = setting_slug(setting)
        base = first(f"{slug}/pruned.json")
        for name in ("pruned", "pruned.json"):
            _link(base / slug / name, part / slug / name)
    log.info("linked the dense scores and pruned %s from %s into %s", ", ".join(settings),
             ", ".join(map(str, bases)), part)


def merge_parts(parts: Sequence[Path], out: Path) -> int:
    """Gather every part's dense scores and setting folders into `out` (hard links); returns the files added.

    A file present in two places must be identical (the base's links, a cell run once); else the merge stops
    before writing anything, naming the file.
    """
    out = Path(out)
    plan: dict[Path, Path] = {}
    for part in map(Path, parts):
        if not part.is_dir():
            raise RecoveryError(f"--merge-from {part}: no such folder.")
        for path in sorted(part.rglob("*")):
            rel = path.relative_to(part)
            if path.is_dir() or (len(rel.parts) == 1 and rel.name not in SHARED_TOP):
                continue
            for other in (plan.get(rel), out / rel):
                if other is not None and other.exists() and not filecmp.cmp(other, path, shallow=False):
                    raise RecoveryError(f"{rel} differs between {other} and {path}: two runs of one cell, or parts "
                                        "pruned separately; merge parts made from one --base.")
            plan.setdefault(rel, path)
    added = 0
    for rel, source in plan.items():
        if not (out / rel).exists():
            _link(source, out / rel)
            added += 1
    log.info("merged %d files from %d parts into %s", added, len(parts), out)
    return added


def _link(source: Path, target: Path) -> None:
    """Hard-link a file or every file of a folder (copying where the file system refuses links)."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_link_file)
    else:
        _link_file(source, target)


def _link_file(source, target) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
