"""One supervisor per run: it starts every thread, delivers every message, and alone decides
when a destination has stalled and when a cancelled run gives up waiting.

Threads never call the caller's callback: a lane (one destination's thread) and the reader post
messages to the supervisor's outbox, and the calling thread, inside :meth:`Supervisor.run`,
delivers them in order.  So views and jobs are single-threaded, and a lane the supervisor has
given up on (stalled, or still inside a system call after a cancel's grace) can post whatever
it likes: nothing of it reaches the caller.

Cancellation is stated up front, trio-style: ``run`` returns only once every lane has finished
or been abandoned; a cancel raises :class:`~popsicle_py.errors.Cancelled` after that.  A lane
checks :attr:`Lane.stopped` between system calls, and every call is bounded by the drive's
pacer (about half a second of its measured speed), so giving up on one costs no more than that.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from popsicle_py.blockdev import Pacer, as_oserror
from popsicle_py.engine.config import CANCEL_GRACE, POLL, STALL_BYTES
from popsicle_py.errors import Cancelled, Stalled

#: Process signals that a worker thread must never take.
_MAIN_THREAD_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})

Callback = Callable[[Any], None]
CancelCheck = Callable[[], bool]


def keep_signals_for_main_thread() -> None:
    """Block the stop signals in the calling (worker) thread.

    The kernel hands a process signal to any thread that does not block it, and a thread
    stuck in a throttled O_DIRECT write cannot run even the C-level handler until the write
    returns: Ctrl-C would wait for the slowest drive.  Blocked here, the signal goes to the
    main thread, which runs Python's handlers anyway.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _MAIN_THREAD_SIGNALS)


class Lane:
    """One destination's thread, as the supervisor sees it.  Its state is all declared here."""

    def __init__(self, index: int, dest: Any, outbox: queue.SimpleQueue[Any],
                 stop: threading.Event) -> None:
        self.id = index
        self.dest = dest
        self.done = 0  # bytes written (or read back, for a verifier)
        self.skipped = 0  # bytes left alone because the destination held them already
        self.repaired = 0
        self.mismatch: int | None = None
        self.error: OSError | None = None
        self.finished = False  # its thread returned
        self.abandoned = False  # the supervisor gave up on it
        self.waiting = True  # waiting for data or for the reader, which is never a stall
        self.detach = False  # asked to leave the ring and go on alone
        self.solo = False  # reading the source by position on its own
        self.rejoin: int | None = None  # the bucket where a solo lane must come back to the ring
        self.last_progress = time.monotonic()
        self.recent = 0  # bytes moved since last_progress, short of STALL_BYTES
        self.pacer = Pacer()
        self.thread: threading.Thread | None = None
        self._outbox = outbox
        self._stop = stop

    @property
    def stopped(self) -> bool:
        """The run is ending or this lane was given up: do not start another system call."""
        return self._stop.is_set() or self.abandoned

    def post(self, message: Any) -> None:
        self._outbox.put(message)

    def touch(self) -> None:
        """A new step begins (or a wait ended): the stall clock starts again."""
        self.last_progress = time.monotonic()
        self.recent = 0

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more were moved; every STALL_BYTES of them count as progress."""
        self.recent += nbytes
        if self.recent >= STALL_BYTES:
            self.touch()


@dataclass(frozen=True)
class _Finished:
    id: int


@dataclass(frozen=True)
class _ReaderDone:
    error: BaseException | None


class Supervisor:
    """Runs a reader and a task per lane; delivers their messages on the calling thread."""

    def __init__(self, destinations: Sequence[Any], callback: Callback, cancel: CancelCheck, *,
                 stall_timeout: float | None, errored: Callable[[int, OSError], Any],
                 name: str) -> None:
        if not destinations:
            raise ValueError("no destinations: give at least one")
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.stop = threading.Event()
        self.lanes = [Lane(i, d, self.outbox, self.stop) for i, d in enumerate(destinations)]
        self._callback = callback
        self._cancel = cancel
        self._stall_timeout = stall_timeout
        self._errored = errored
        self._name = name
        #: Wakes every thread waiting on the run's conditions (set by the run's owner).
        self.wake: Callable[[], None] = lambda: None
        #: Called (on the calling thread) when a lane is given up or fails, before its message.
        self.on_leave: Callable[[Lane], None] = lambda lane: None

    def halt(self) -> None:
        self.stop.set()
        self.wake()

    def run(self, task: Callable[[Lane], None],
            reader: Callable[[], None] | None = None) -> BaseException | None:
        """Run until every lane is done; return the reader's error (the caller raises it).

        Raises :class:`Cancelled` once everything that can stop has stopped.
        """
        for lane in self.lanes:
            lane.thread = threading.Thread(target=self._guard, args=(lane, task), daemon=True,
                                           name=f"popsicle-{self._name}-{lane.id}")
        reader_error: BaseException | None = None
        reader_done = reader is None
        if reader is not None:
            threading.Thread(target=self._read_guard, args=(reader,), daemon=True,
                             name=f"popsicle-{self._name}-reader").start()
        for lane in self.lanes:
            assert lane.thread is not None
            lane.thread.start()
        cancelled = False
        deadline = 0.0
        try:
            while not (reader_done and all(lane.finished or lane.abandoned
                                           for lane in self.lanes)):
                try:
                    message = self.outbox.get(timeout=POLL)
                except queue.Empty:
                    message = None
                if isinstance(message, _Finished):
                    self.lanes[message.id].finished = True
                elif isinstance(message, _ReaderDone):
                    reader_done = True
                    if message.error is not None and not cancelled:
                        reader_error = message.error
                        self.halt()
                elif message is not None:
                    self._deliver(message)
                if not cancelled and self._cancel():
                    cancelled = True
                    deadline = time.monotonic() + CANCEL_GRACE
                    self.halt()
                now = time.monotonic()
                if cancelled and now > deadline:
                    for lane in self.lanes:
                        lane.abandoned = lane.abandoned or not lane.finished
                    break
                if not cancelled:
                    self._check_stalls(now)
            self._drain()
        finally:
            # Whatever ends the run (the end, a cancel, an exception from the callback or from
            # cancel()), the threads must not go on: abandoned ones stop when their call returns.
            self.halt()
        if cancelled:
            raise Cancelled("cancelled")
        return reader_error

    def _deliver(self, message: Any) -> None:
        lane_id = getattr(message, "id", None)
        if lane_id is not None and self.lanes[lane_id].abandoned:
            return
        self._callback(message)

    def _drain(self) -> None:
        """Deliver what finished lanes posted before they finished."""
        while True:
            try:
                message = self.outbox.get_nowait()
            except queue.Empty:
                return
            if not isinstance(message, (_Finished, _ReaderDone)):
                self._deliver(message)

    def _check_stalls(self, now: float) -> None:
        limit = self._stall_timeout
        if limit is None:
            return
        for lane in self.lanes:
            if lane.finished or lane.abandoned or lane.waiting:
                continue
            if now - lane.last_progress > limit:
                moved = lane.recent
                why = (f"stalled: no progress for {limit:g} s" if not moved else
                       f"stalled: only {moved // 1024} KiB in {limit:g} s (a dying or fake "
                       "drive?)")
                lane.error = Stalled(why)
                lane.abandoned = True
                self.on_leave(lane)
                self._callback(self._errored(lane.id, lane.error))

    def _guard(self, lane: Lane, task: Callable[[Lane], None]) -> None:
        keep_signals_for_main_thread()
        try:
            task(lane)
        except Exception as exc:  # every failure of a destination becomes a message
            if not lane.abandoned:
                lane.error = as_oserror(exc)
                self.on_leave(lane)
                lane.post(self._errored(lane.id, lane.error))
        finally:
            self.outbox.put(_Finished(lane.id))

    def _read_guard(self, reader: Callable[[], None]) -> None:
        keep_signals_for_main_thread()
        try:
            reader()
        except BaseException as exc:  # handed to the calling thread, which raises it
            self.outbox.put(_ReaderDone(exc))
        else:
            self.outbox.put(_ReaderDone(None))
