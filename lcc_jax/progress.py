"""Progress bars and logging for long stages: one look everywhere (tqdm for items, logging for results), and
the time left for the whole job while a `Plan` of estimated stages is followed (`follow`)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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


class _Bar(tqdm):
    """tqdm that also tells the followed `Plan` how far it got, and shows the whole job's time left."""

    def __init__(self, *args, unit: str = "it", **kwargs):
        super().__init__(*args, unit=unit, **kwargs)
        self._done, self._unit = self.n, unit  # counted here too: a disabled bar counts nothing
        self._job_note, self._postfix = "", getattr(self, "_postfix", "")  # set already if tqdm got a postfix
        if _plan is not None:
            _plan.bar_opened(self.n, self.total)

    def update(self, n=1):
        out = super().update(n)
        self._done += n
        if _plan is not None:
            note = _plan.bar_moved(self._done, self.total, self._unit)
            if note and not self.disable:
                self._job_note = note
                self.set_postfix_str(", ".join(p for p in (self._postfix, note) if p), refresh=False)
        return out

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        """The caller's postfix (e.g. the trainer's loss), then the job's time left."""
        self._postfix = ", ".join(f"{k}={v}" for k, v in {**(ordered_dict or {}), **kwargs}.items())
        note = getattr(self, "_job_note", "")  # tqdm's own __init__ may set a postfix before ours ran
        self.set_postfix_str(", ".join(p for p in (self._postfix, note) if p), refresh=refresh)


def bar(total: int | None = None, desc: str = "", unit: str = "it", **kwargs) -> tqdm:
    """A tqdm bar (items, rate, time left; with a followed `Plan`, the job's time left too) that respects
    `bars_enabled()`; use as a context manager."""
    kwargs.setdefault("disable", not bars_enabled())
    return _Bar(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, **kwargs)


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


# ------------------------------------------------------------------------------ time left for the whole job


class Plan:
    """A job's stages and their estimated seconds (`lcc_jax.estimate`), followed while the job runs.

    Stages announce themselves (`stage_begins` / `stage_ends`, called by `restore.job_folder.stage` and the
    benchmark's cells); a stage that never does (the export between fold and the last evaluation, the plots)
    is measured as the gap it leaves. Time left for the job = the current stage's (from its bar's measured
    step rate once it has one, else its estimate) + the later stages' estimates x the ratio of measured to
    estimated seconds of the stages done so far. `bars` says how many progress bars a stage shows in turn
    (the dense capture: three), so one bar's rate can stand for the whole stage.
    """

    def __init__(self, stages: Sequence[tuple[str, float]], bars: dict[str, int] | None = None,
                 logger: logging.Logger | None = None, clock: Callable[[], float] = time.perf_counter):
        self.order = [name for name, _ in stages]
        self.predicted = {name: float(seconds) for name, seconds in stages}
        self.bars = {name: 1 for name in self.order} | dict(bars or {})
        self.measured: dict[str, float] = {}
        self.log = logger or logging.getLogger("lcc_jax.progress")
        self.clock = clock
        self.started = self.last_end = clock()
        self.current: str | None = None
        self.stage_started = 0.0
        self._bar_index = -1  # bars opened in the current stage, minus one
        self._bar: dict[str, float] | None = None  # the current bar: first update's time and count, last seen
        self._refined: set[str] = set()

    # -- bookkeeping
    def begin(self, name: str) -> None:
        if name not in self.predicted:
            return  # a stage of a nested job (the benchmark's RestoreLCC cell): its cell is the plan's stage
        now = self.clock()
        self._close_gap(self.order.index(name), now)
        self.current, self.stage_started, self._bar_index, self._bar = name, now, -1, None

    def end(self, name: str, seconds: float | None = None) -> None:
        if name != self.current:
            return
        now = self.clock()
        self.measured[name] = now - self.stage_started if seconds is None else seconds
        self.current, self.last_end = None, now

    def finish(self, stopped: bool = False) -> dict[str, dict[str, float]]:
        """Close the plan; {stage: predicted, measured}. What ran after the last stage is the remaining stages',
        unless the job was `stopped`: then only the stages that ended count (the rest never ran)."""
        if not stopped:
            self._close_gap(len(self.order), self.clock())
        return {name: {"predicted": round(self.predicted[name], 1), "measured": round(self.measured[name], 1)}
                for name in self.order if name in self.measured}

    def _close_gap(self, upto: int, now: float) -> None:
        skipped = [n for n in self.order[:upto] if n not in self.measured and n != self.current
                   and self.predicted[n] > 0]
        weight = sum(self.predicted[n] for n in skipped)
        for n in skipped:
            self.measured[n] = (now - self.last_end) * self.predicted[n] / weight
        self.last_end = max(self.last_end, now) if skipped else self.last_end

    # -- estimates
    def correction(self) -> float:
        """Measured / estimated seconds of the stages done (1 until they add up to 10 s estimated), in [0.25, 4]."""
        predicted = sum(self.predicted[n] for n in self.measured)
        if predicted < 10.0:
            return 1.0
        return min(4.0, max(0.25, sum(self.measured.values()) / predicted))

    def stage_left(self, now: float | None = None) -> float:
        """Seconds left in the current stage: from its bar's measured rate, else its corrected estimate."""
        if self.current is None:
            return 0.0
        now = self.clock() if now is None else now
        guess = max(0.0, self.predicted[self.current] * self.correction() - (now - self.stage_started))
        b = self._bar
        if (b is None or b["n"] - b["n0"] < 1 or now - b["t0"] < 1.0 or not b["total"]
                or self.bars.get(self.current, 1) == 0):  # bars=0: its bars do not measure it (nested jobs)
            return guess
        rate = (b["n"] - b["n0"]) / (now - b["t0"])
        this_bar = (b["total"] - b["n"]) / rate
        later_bars = max(0, self.bars.get(self.current, 1) - self._bar_index - 1) * b["total"] / rate
        return this_bar + later_bars

    def left(self, now: float | None = None) -> float:
        """Seconds left in the whole job."""
        later = [n for n in self.order if n not in self.measured and n != self.current]
        return self.stage_left(now) + self.correction() * sum(self.predicted[n] for n in later)

    # -- bars
    def bar_opened(self, n: float = 0, total: float | None = None) -> None:
        """A bar starts in the current stage (after its programs compiled: capture, training), at count `n`."""
        if self.current is not None:
            self._bar_index += 1
            self._bar = {"t0": self.clock(), "n0": n, "n": n, "total": total or 0}

    def bar_moved(self, n: float, total: float | None, unit: str) -> str | None:
        """Record a bar's progress; returns the job's time left for its postfix (None outside a stage)."""
        if self.current is None:
            return None
        now = self.clock()
        if self._bar is None:  # a bar opened before its stage began
            self._bar = {"t0": now, "n0": n, "n": n, "total": total or 0}
        self._bar["n"] = n
        left = self.left(now)
        b = self._bar
        if (self.current not in self._refined and self.bars.get(self.current, 1) and total
                and b["n"] - b["n0"] >= max(1, 0.1 * total)
                and n < total and now - b["t0"] >= 2.0):
            self._refined.add(self.current)
            per = (now - b["t0"]) / (b["n"] - b["n0"])
            self.log.info("%s: %.2f s/%s measured after %d of %d; stage about %s more (estimated %s in all), job "
                          "about %s more", self.current, per, unit, n, total, duration(self.stage_left(now)),
                          duration(self.predicted[self.current]), duration(left))
        return f"job {duration(left)} left"


_plan: Plan | None = None


def follow(stages: Sequence[tuple[str, float]], bars: dict[str, int] | None = None,
           logger: logging.Logger | None = None) -> Plan:
    """Follow a job's estimated stages from now on (the bars and stage lines show the job's time left)."""
    global _plan
    _plan = Plan(stages, bars, logger)
    return _plan


def following() -> Plan | None:
    return _plan


def stop_following(stopped: bool = False) -> dict[str, dict[str, float]]:
    """Stop following; returns {stage: {predicted, measured}} of the stages run (empty when none was followed);
    `stopped`: the job was interrupted, so only the stages that ended are measured."""
    global _plan
    plan, _plan = _plan, None
    return plan.finish(stopped) if plan is not None else {}


def stage_begins(name: str) -> str:
    """Tell the followed plan a stage starts; returns a note for its log line ('' when not followed)."""
    if _plan is None or name not in _plan.predicted:
        return ""
    _plan.begin(name)
    return f" (estimated {duration(_plan.predicted[name])}; job about {duration(_plan.left())} left)"


def stage_ends(name: str, seconds: float | None = None) -> str:
    """Tell the followed plan a stage ended; returns a note for its log line ('' when not followed)."""
    if _plan is None or name != _plan.current:
        return ""
    _plan.end(name, seconds)
    return f" (estimated {duration(_plan.predicted[name])}; job about {duration(_plan.left())} left)"


@contextlib.contextmanager
def plan_stage(name: str) -> Iterator[None]:
    """`with plan_stage("wanda:0.5/seed0/lora"):` a stage of the followed plan that `job_folder.stage` does not mark."""
    note = stage_begins(name)
    if note:
        logging.getLogger("lcc_jax.progress").info("%s ...%s", name, note)
    yield
    note = stage_ends(name)
    if note:
        logging.getLogger("lcc_jax.progress").info("%s done%s", name, note)


def duration(seconds: float) -> str:
    """3 s, 4m05s, 2h10m."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
