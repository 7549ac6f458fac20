"""One blocking read loop on a thread of its own, watched from the calling thread.

A read of a file whose disk or network share hangs does not return, and a thread inside it
cannot run Python's signal handlers: on the calling thread, Ctrl-C would wait for the kernel.
Here the loop runs on a worker thread (stop signals blocked, as a lane's) and the calling
thread waits in short steps, calling ``tick`` at each: a cancel, or less than STALL_BYTES
moved in the stall timeout, ends the wait at once.  The worker is told to stop and left in
its call, as a stalled lane is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar, cast

from popsicle_py.engine.config import POLL
from popsicle_py.engine.lane import Clock
from popsicle_py.engine.supervisor import keep_signals_for_main_thread
from popsicle_py.errors import InterruptedWhileHung

T = TypeVar("T")

#: How long a worker may take to leave its call after Ctrl-C before it is said to be hung.
HUNG_GRACE = 0.5


class WorkStalled(Exception):
    """The work moved less than STALL_BYTES in ``limit`` seconds (``moved`` bytes)."""

    def __init__(self, limit: float, moved: int) -> None:
        super().__init__(f"no progress for {limit:g} s")
        self.limit = limit
        self.moved = moved


class _Outcome(Generic[T]):
    """What the worker left: its result or its exception (set before ``done``)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


def watched(work: Callable[[Clock, Callable[[], bool]], T], *,
            cancel: Callable[[], bool] | None, stall_timeout: float | None,
            tick: Callable[[], None] = lambda: None, name: str = "work",
            clock: Clock | None = None, hung_note: str | None = None) -> T | None:
    """``work(clock, stopped)``'s result, or None once ``cancel()`` said so.

    ``work`` counts what it moves with ``clock.advance`` and checks ``stopped()`` between its
    calls (or ``tick`` moves ``clock``, if given, from the calling thread).  Raises what
    ``work`` raised, or :class:`WorkStalled`.  Ctrl-C while ``work`` has not left its call
    HUNG_GRACE later (a hung disk or share, which the process cannot end before) raises
    :class:`~popsicle_py.errors.InterruptedWhileHung` with ``hung_note``.
    """
    if cancel is not None and cancel():
        return None
    clock = clock or Clock()
    clock.waiting = False
    stop = threading.Event()
    outcome: _Outcome[T] = _Outcome()

    def run() -> None:
        keep_signals_for_main_thread()
        try:
            outcome.result = work(clock, stop.is_set)
        except BaseException as exc:  # handed to the calling thread, which raises it
            outcome.error = exc
        finally:
            outcome.done.set()

    threading.Thread(target=run, daemon=True, name=f"popsicle-{name}").start()
    try:
        while not outcome.done.wait(POLL):
            tick()
            if cancel is not None and cancel():
                return None
            if stall_timeout is not None and clock.stalled(time.monotonic(), stall_timeout):
                raise WorkStalled(stall_timeout, clock.recent)
    except KeyboardInterrupt:
        stop.set()
        if hung_note is not None and not outcome.done.wait(HUNG_GRACE):
            raise InterruptedWhileHung(hung_note) from None
        raise
    finally:
        stop.set()
    tick()
    if outcome.error is not None:
        raise outcome.error
    return outcome.result



class _ReadCalls:
    """How many read calls one thread has completed, as the kernel counts them (``syscr`` of
    /proc/self/task/TID/io): a call that hangs is never counted."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.seen: int | None = None

    def attach(self) -> None:
        """Count the calling thread's reads (called on the watched thread)."""
        self.path = f"/proc/self/task/{threading.get_native_id()}/io"

    def moved(self) -> bool:
        """True when a read call completed since last asked, or when reads cannot be counted
        here (no task I/O accounting): never call a stall that cannot be seen."""
        if self.path is None:
            return True
        try:
            with open(self.path, "rb") as f:
                count = next(int(line.split()[1]) for line in f if line.startswith(b"syscr:"))
        except (OSError, StopIteration, ValueError, IndexError):
            return True
        moved, self.seen = count != self.seen, count
        return moved


def watched_calls(work: Callable[[], T], *, stall_timeout: float | None,
                  name: str = "work", hung_note: str | None = None) -> T:
    """``work()`` on a thread of its own: Ctrl-C (KeyboardInterrupt on the calling thread) is
    heard while a read in it hangs, and no read call of it returning for ``stall_timeout``
    raises :class:`WorkStalled`.

    For work that reads a little, here and there (an image's head, its end, its partition
    tables), where a byte count would say nothing: a hung call is what is watched.
    """
    return cast(T, watched_reads(work, stall_timeout=stall_timeout, cancel=None, name=name,
                                 hung_note=hung_note))


def watched_reads(work: Callable[[], T], *, stall_timeout: float | None,
                  cancel: Callable[[], bool] | None, name: str = "work",
                  hung_note: str | None = None) -> T | None:
    """:func:`watched_calls`, and None once ``cancel()`` says so (a run's own stop flag,
    where Ctrl-C sets a flag rather than raising)."""
    calls = _ReadCalls()
    clock = Clock()

    def run(_clock: Clock, _stopped: Callable[[], bool]) -> T:
        calls.attach()
        return work()

    def tick() -> None:
        if calls.moved():
            clock.touch()

    return watched(run, cancel=cancel, stall_timeout=stall_timeout, tick=tick, name=name,
                   clock=clock, hung_note=hung_note)
