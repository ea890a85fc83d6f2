"""The output folder of a restore job: which run owns it, how results appear in it, and who writes them.

* `claim` pins the configuration in run.json (a different one is refused unless `restart`), removes
  the temporary leftovers of an interrupted run, and checks that every process sees the folder.
* `write_text`, `save_file` and `save_folder` make a result appear whole or not at all: written under a
  temporary name, then renamed in one step that SIGINT / SIGTERM cannot split. A write that fails
  removes its temporary (a full disk becomes `errors.DiskFull`, naming the file); one cut by a signal
  leaves it for the next `claim` to clear. With several JAX processes only process 0 writes, and all
  processes wait for it, so they agree on what is done.
* `stage` logs and times a stage; out of memory there becomes an `OutOfMemory` naming the settings
  to lower, and an interruption is logged with how to resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lcc_jax import progress
from lcc_jax.distributed import all_true, barrier, is_primary, multi_process
from lcc_jax.errors import UserError, disk_full_explained
from lcc_jax.restore.hints import MEMORY_ONLY, is_out_of_memory, out_of_memory
from lcc_jax.signals import critical

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
TIMINGS_FILE = "timings.json"
# Temporary names used below, by the exporters' staging folders and by capture.save_npy.
_LEFTOVER = re.compile(r"\.(tmp\..+|.+\.(tmp\d*|partial(-[0-9a-f]+)?|old-[0-9a-f]+))")


class RestoreError(UserError):
    """A restore job that cannot go on as asked (e.g. a changed configuration against an old folder)."""


def claim(out: Path, fingerprint: dict[str, Any], restart: bool) -> None:
    """Make `out` this run's folder: new, the same run resumed, or (with `restart`) emptied for a new one."""
    run_file = out / RUN_FILE
    fingerprint = json.loads(json.dumps(fingerprint, default=str))
    previous = json.loads(run_file.read_text()) if run_file.exists() else None
    changed = _changes(previous, fingerprint) if previous is not None else []
    if changed and not restart:
        raise RestoreError(
            f"{out} holds a run with a different configuration ({'; '.join(changed)}). Use a new --out folder, "
            "or pass --restart to discard the old results and start over."
        )
    barrier(f"lcc_jax claim read {out}")  # every process has read run.json before process 0 changes it
    if is_primary():
        if changed:
            log.warning("--restart: discarding %s (%s)", out, "; ".join(changed))
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        for leftover in remove_leftovers(out):
            log.info("removed %s, left by an interrupted run", leftover.name)
        if previous is None or changed:
            _atomic_write(run_file, json.dumps(fingerprint, indent=2) + "\n")
    barrier(f"lcc_jax claimed {out}")
    if multi_process() and not all_true(run_file.exists()):
        raise RestoreError(
            f"{out} is not visible from every process: with several hosts --out must be on storage all of them "
            "mount (NFS, Filestore, a gcsfuse bucket), at the same path."
        )


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the temporary files and folders of interrupted writes directly inside `out`; returns them."""
    found = [p for p in out.iterdir() if _LEFTOVER.fullmatch(p.name)]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def write_text(path: Path, text: str) -> None:
    """Atomically write a small text file (process 0 only; every process waits for it)."""
    if is_primary():
        _atomic_write(path, text)
    barrier(f"lcc_jax wrote {path}")


def save_file(path: Path, save: Callable[[Path], Any]) -> None:
    """save(temporary path) then rename onto `path` (process 0 only; every process waits for it)."""
    if is_primary():
        tmp = path.with_name(f".tmp.{path.name}")  # ends like `path`, so np.savez adds no suffix
        with _cleaned_up(path, tmp):
            save(tmp)
        with critical():
            tmp.replace(path)
    barrier(f"lcc_jax saved {path}")


def save_folder(folder: Path, save: Callable[[Path], Any]) -> None:
    """save(temporary folder) then rename onto `folder` (process 0 only; every process waits for it)."""
    if is_primary():
        tmp = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        with _cleaned_up(folder, tmp):
            save(tmp)
        with critical():
            tmp.replace(folder)
    barrier(f"lcc_jax saved {folder}")


class stage:
    """`with stage(job, "train"):` logs, times (out/timings.json) and explains failures of one stage."""

    def __init__(self, job: Any, name: str):
        self.job, self.name = job, name

    def __enter__(self) -> stage:
        self.start = time.perf_counter()
        log.info("stage %s ...%s", self.name, progress.stage_begins(self.name))
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is None:
            seconds = time.perf_counter() - self.start
            path = self.job.out / TIMINGS_FILE
            timings = json.loads(path.read_text()) if path.exists() else {}
            timings[self.name] = round(seconds, 2)
            write_text(path, json.dumps(timings, indent=2) + "\n")
            log.info("stage %s done in %.1f s%s", self.name, seconds, progress.stage_ends(self.name, seconds))
            return False
        if issubclass(kind, KeyboardInterrupt):
            log.warning("stage %s interrupted", self.name)
        elif is_out_of_memory(error):
            raise out_of_memory(self.name, self.job, error) from error
        return False


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with _cleaned_up(path, tmp):
        tmp.write_text(text)
    with critical():
        tmp.replace(path)


@contextlib.contextmanager
def _cleaned_up(path: Path, tmp: Path) -> Iterator[None]:
    """A write of `path` into `tmp` that fails removes `tmp`; out of disk space it says so, naming `path`."""
    try:
        with disk_full_explained(path):
            yield
    except Exception:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


# Settings added after folders were written, with the value those folders' runs had.
ADDED_SINCE: dict[str, Any] = {"negatives": "auto", "probe_seed": 0, "param_dtype": "float32", "spread_heads": False}


def _changes(previous: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """'restore.top_k: 0.25 -> 0.5' for every field that differs, memory-only settings excepted."""
    if not (isinstance(previous, dict) and isinstance(current, dict)):
        return [] if previous == current else [f"{prefix or 'value'}: {_short(previous)} -> {_short(current)}"]
    out = []
    for key in sorted(set(previous) | set(current)):
        if key in MEMORY_ONLY:
            continue
        if key not in previous and ADDED_SINCE.get(key, object()) == current.get(key):
            continue  # a setting added later, at the value older runs used without naming it
        out += _changes(previous.get(key), current.get(key), f"{prefix}.{key}" if prefix else key)
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
