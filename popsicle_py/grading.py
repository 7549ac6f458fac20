"""Grading drives: the rules that reject a drive, as plain functions over plain numbers.

A duplicator rejects sticks that are slow or of the wrong size rather than hand them out as
good.  These decide; the job (:mod:`popsicle_py.flash`) feeds them what it sees and stops a
rejected drive (a :class:`~popsicle_py.errors.Rejected` failure: status ``rejected``).

Speed is judged at steady state only: the first seconds of each phase are ignored (a stick's
write cache takes bursts far above what it sustains), then the speed over a sliding window
must stay above the minimum.  A phase shorter than that is never judged.  Time spent waiting
for the image is not the drive's: it is left out of the write speed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ParamSpec, Protocol

from popsicle_py.errors import Rejected
from popsicle_py.records import record
from popsicle_py.units import format_size

if TYPE_CHECKING:
    from popsicle_py.engine.config import PutBack

P = ParamSpec("P")

#: Seconds of each phase that are not judged (start-up, a write cache's burst).
WARMUP = 2.0
#: Seconds of steady state over which a speed is measured before it is judged.
WINDOW = 3.0


def format_rate(rate: float) -> str:
    return f"{format_size(int(rate))}/s"


def capacity_verdict(size: int, capacity: int | None, tolerance: float) -> str | None:
    """Why a drive of ``size`` bytes is outside ``capacity`` +- ``tolerance`` percent, or None."""
    if capacity is None:
        return None
    low, high = capacity * (1 - tolerance / 100), capacity * (1 + tolerance / 100)
    if low <= size <= high:
        return None
    return (f"holds {format_size(size)}, outside the {format_size(capacity)} "
            f"(+-{tolerance:g}%) asked for")


@record
class SpeedRule:
    """Minimum steady speeds in bytes per second (None: not judged)."""

    min_write: int | None = None
    min_read: int | None = None
    warmup: float = WARMUP
    window: float = WINDOW

    @property
    def active(self) -> bool:
        return self.min_write is not None or self.min_read is not None


@dataclass
class SpeedJudge:
    """One drive's speeds, phase by phase; :meth:`feed` says when it is too slow."""

    rule: SpeedRule
    phase: str = ""
    started: float = 0.0
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    last: int = 0
    clock: float = float("-inf")  # the drive's own time: never goes back

    def feed(self, phase: str, done: int, now: float, waited: float = 0.0) -> str | None:
        """``done`` bytes of ``phase`` ("write" or "read") at ``now``: why the drive is too
        slow, once that is clear, else None.

        ``waited``: the seconds the drive has spent so far waiting for the image (a download,
        a decompression, a pipe slower than the drive), which are not its own: only the time
        it had data to write is counted (a fast stick fed at 5 MB/s was rejected as slow)."""
        # A wait is counted once it ends: the drive's time never goes back meanwhile.
        now = self.clock = max(self.clock, now - waited)
        minimum = self.rule.min_write if phase == "write" else self.rule.min_read
        if phase != self.phase or done < self.last:  # a new pass (the head read back alone)
            self.phase, self.started = phase, now
            self.samples.clear()
        self.last = done
        if minimum is None or now - self.started < self.rule.warmup:
            return None
        self.samples.append((now, done))
        while len(self.samples) > 1 and now - self.samples[1][0] >= self.rule.window:
            self.samples.popleft()
        first_time, first_done = self.samples[0]
        span = now - first_time
        if span < self.rule.window:
            return None
        rate = (done - first_done) / span
        if rate >= minimum:
            return None
        verb = "writes" if phase == "write" else "reads back"
        return (f"too slow: {verb} at {format_rate(rate)} at steady state, below the minimum "
                f"of {format_rate(minimum)}")


class Sized(Protocol):
    @property
    def size(self) -> int: ...


def capacity_check(capacity: int | None, tolerance: float
                   ) -> Callable[[Sized, Callable[[], None]], None] | None:
    """What a job runs on each drive before writing it (a :data:`~.engine.config.Prepare`):
    a drive outside the capacity is rejected (cause ``capacity``) with nothing written."""
    if capacity is None:
        return None

    def check(device: Sized, answered: Callable[[], None]) -> None:
        why = capacity_verdict(device.size, capacity, tolerance)
        if why is not None:
            raise Rejected("capacity", why)

    return check


def chain(*steps: Callable[P, PutBack | None] | None
          ) -> Callable[P, PutBack | None] | None:
    """The steps given (None: none), one after the other; the put-backs they return, as one
    (each step's put-back is called if a later step raises: nothing is left half done).

    Every put-back is called even if one of them raises; the error that stopped the steps is
    the one raised, never one from putting back after it (a pulled drive fails both)."""
    given = [s for s in steps if s is not None]
    if not given:
        return None
    if len(given) == 1:
        return given[0]

    def run(*args: P.args, **kwargs: P.kwargs) -> PutBack | None:
        backs: list[PutBack] = []
        try:
            for step in given:
                back = step(*args, **kwargs)
                if back is not None:
                    backs.append(back)
        except BaseException:
            _all_of(backs, 0)
            raise
        if not backs:
            return None

        def put_back(stamped: int) -> None:
            error = _all_of(backs, stamped)
            if error is not None:
                raise error

        return put_back

    return run


def _all_of(backs: list[PutBack], stamped: int) -> Exception | None:
    """Call every put-back, last first; the first error any of them raised."""
    first: Exception | None = None
    for back in reversed(backs):
        try:
            back(stamped)
        except Exception as exc:  # the others still put back theirs
            first = first or exc
    return first
