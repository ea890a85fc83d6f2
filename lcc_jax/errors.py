"""The errors a user can fix: a bad flag, a missing file, a model we do not read, a full disk.

Every user-facing error class of the library derives from `UserError` (a `ValueError`, so existing
`except ValueError` code still catches them). The scripts print such an error as one `error: ...` line
and exit 2 (`lcc_jax.cli.script`); anything else is a fault in lcc_jax and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

# errno values that mean "this disk cannot take more": no space left, over quota.
_FULL = (errno.ENOSPC, errno.EDQUOT)


class UserError(ValueError):
    """Input or settings the user can change; the message names the problem and the fix."""


class DiskFull(UserError):
    """A write ran out of disk space; whatever it had half-written is removed."""


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _FULL


def disk_full(path: str | Path, error: OSError) -> DiskFull:
    """A `DiskFull` saying where the write failed, how much room is left there and what to do."""
    path = Path(path).expanduser().absolute()
    free = ""
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage(next((p for p in (path, *path.parents) if p.exists()), path.anchor))
        free = f", {usage.free / 1e9:.1f} GB free of {usage.total / 1e9:.1f} GB"
    return DiskFull(
        f"the disk is full: writing {path} failed ({error.strerror or error}{free}); nothing half-written was "
        f"left behind. Free space on the disk that holds {path.parent}, or write to another disk, and run again "
        "(a restore job resumes from its finished stages)."
    )


@contextlib.contextmanager
def disk_full_explained(path: str | Path) -> Iterator[None]:
    """Turn "no space left on device" (or over quota) inside the block into a `DiskFull` naming `path`."""
    try:
        yield
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(path, e) from e
        raise
