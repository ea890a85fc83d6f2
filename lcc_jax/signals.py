"""Stop long jobs cleanly on SIGINT / SIGTERM, and never in the middle of promoting a finished result.

* `graceful()`: while inside, SIGINT (Ctrl-C) and SIGTERM (`kill`, a scheduler's time limit, a TPU
  VM's preemption notice) raise `Interrupted`, a KeyboardInterrupt, in the main thread, so `finally`
  blocks run, a stage's partial output stays in its temporary location, and the process exits with
  `128 + signal` (130 or 143) as a shell expects. A second signal gets the previous handling (the
  default terminates), for a process blocked where Python cannot raise.
* `critical()`: a short section that a signal must not cut in half (the renames that swap a finished
  folder into place). A signal arriving inside is held and delivered to the previous handler as
  soon as the section ends (so it still interrupts, or kills, as it would have).

Both are no-ops outside the main thread, where Python cannot install signal handlers.

Long loops enter `graceful()` around each unit of work (a recovery cell, an ablation grid), not only once: on an
H100 (2026-12-07) a recovery run that relied on Python's default SIGINT handler trained on past the SIGINT sent
to stop it, while the ablation, whose stages install the handler themselves, stopped at it. Why the default
handler did not act there was not found; installing ours once the device is up is what worked.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived inside `graceful()`."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by this signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _install(handler) -> dict:
    """`handler` for SIGINT and SIGTERM; returns the handlers it replaced."""
    return {s: signal.signal(s, handler) for s in SIGNALS}


def _restore(previous: dict) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)


@contextlib.contextmanager
def graceful() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` while inside (previous handlers restored on exit)."""
    if not _main_thread():
        yield
        return

    def interrupt(signum, frame):
        log.warning("received %s: stopping; finished results are kept (send it again to stop at once)",
                    signal.Signals(signum).name)
        _restore(previous)  # a second signal acts as it would have (e.g. terminates a process stuck on another host)
        raise Interrupted(signum)

    previous = _install(interrupt)
    try:
        yield
    finally:
        _restore(previous)


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Hold SIGINT / SIGTERM until the section ends, then deliver the first one to the previous handler."""
    if not _main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum, frame):
        log.warning("received %s while promoting a finished result; stopping right after", signal.Signals(signum).name)
        held.append(signum)

    previous = _install(hold)
    try:
        yield
    finally:
        _restore(previous)
        if held:
            signal.raise_signal(held[0])  # handled now as it would have been: raise, or terminate
