"""Python's cyclic garbage collector paused while many small acyclic objects are built at once.

Building the suite's requests (131,968 id lists read back from the token cache, 20,171 score rows) set the
collector off again and again over a heap that kept growing: more than half the time of those steps on a 2-core
CPU. Lists of ints and arrays make no reference cycles, so a pause loses nothing.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """The collector off inside; on again afterwards (even on an error) only if it was on before."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
