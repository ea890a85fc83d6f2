"""Progress bars and logging for long stages: one look everywhere (tqdm for items, logging for results)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

PROGRESS_ENV = "LCC_PROGRESS"  # "0" turns bars off, "1" forces them on (e.g. in CI logs)
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int | str = logging.INFO) -> None:
    """Log `lcc_jax.*` to stderr with timestamps (for scripts; libraries only emit)."""
    logger = logging.getLogger("lcc_jax")
    logger.setLevel(level)
    if not any(getattr(h, "_lcc_jax", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._lcc_jax = True
        logger.addHandler(handler)
    logger.propagate = False  # a root handler installed by another library would print every line twice


def bars_enabled() -> bool:
    """Bars on a terminal or in a notebook; off in pipes, unless $LCC_PROGRESS says otherwise."""
    forced = os.environ.get(PROGRESS_ENV)
    if forced is not None:
        return forced not in ("0", "false", "no", "")
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def bar(total: int | None = None, desc: str = "", unit: str = "it", **kwargs) -> tqdm:
    """A tqdm bar (items, rate, time left) that respects `bars_enabled()`; use as a context manager."""
    kwargs.setdefault("disable", not bars_enabled())
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, **kwargs)


def track(items: Iterable[T], desc: str = "", total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate `items` behind a progress bar."""
    with bar(total=total if total is not None else _len(items), desc=desc, unit=unit) as b:
        for item in items:
            yield item
            b.update(1)


def _len(items) -> int | None:
    try:
        return len(items)
    except TypeError:
        return None
