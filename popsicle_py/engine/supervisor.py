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

One exception: a lane given up while its head is at risk (:attr:`Lane.at_risk`: being written or
read back) puts the stamp back over it once its call returns.  ``run`` waits for that before it
returns, so that the caller does not let the drive go (close it) under it and the process does
not end before it: as long as that call has not returned (the process could not end before it
anyway), then :data:`UNDO_GRACE` for the stamp's own write; its ``HeadUndone`` is delivered
(one that says the stamp is not back, when that write does not return in time).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from popsicle_py.blockdev import FileLike, as_oserror
from popsicle_py.engine.config import CANCEL_GRACE, POLL, UNDO_GRACE
from popsicle_py.engine.lane import Clock, Lane, Late
from popsicle_py.errors import Cancelled, SourceStalled, Stalled
from popsicle_py.events import Note
from popsicle_py.messages import BusWriterMessage
from popsicle_py.records import record
from popsicle_py.signals import hear_signals_on_main_thread, keep_signals_for_main_thread

#: Receives every message (the engine's, or the caller's own ``post``), on the calling thread.
Callback = Callable[[Any], None]
CancelCheck = Callable[[], bool]

__all__ = ["Callback", "CancelCheck", "Lane", "Supervisor", "hear_signals_on_main_thread",
           "keep_signals_for_main_thread"]


@record
class _Finished:
    id: int


@record
class _ReaderDone:
    error: BaseException | None


class Supervisor:
    """Runs a reader and a task per lane; delivers their messages on the calling thread."""

    def __init__(self, destinations: Sequence[FileLike], callback: Callback, cancel: CancelCheck, *,
                 stall_timeout: float | None, errored: Callable[[int, OSError], object],
                 name: str, wake: Callable[[], None] = lambda: None,
                 leave: Callable[[int], None] = lambda lane_id: None) -> None:
        if not destinations:
            raise ValueError("no destinations: give at least one")
        self.outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.stop = threading.Event()
        self.lanes = [Lane(i, d, self.outbox, self.stop) for i, d in enumerate(destinations)]
        self._callback = callback
        self._cancel = cancel
        self._stall_timeout = stall_timeout
        self._errored = errored
        self._name = name
        #: Wakes every thread waiting on the run's conditions (the ring's).
        self._wake = wake
        #: A lane given up or failed stops holding the others (leaves the ring).
        self._leave = leave

    def halt(self) -> None:
        self.stop.set()
        self._wake()

    def _left(self, lane: Lane) -> None:
        """A lane failed or was given up (before its message): with none left, the run stops."""
        self._leave(lane.id)
        if all(other.error is not None for other in self.lanes):
            self.halt()

    def run(self, task: Callable[[Lane], None], reader: Callable[[], None] | None = None,
            source: Clock | None = None) -> BaseException | None:
        """Run until every lane is done; return the reader's error (the caller raises it).

        ``source`` is the reader's clock: a lane waiting for data is never stalled, so a
        source that hangs is seen there, and the run ends with :class:`SourceStalled` (the
        reader is left in its call, as a stalled lane is).  Raises :class:`Cancelled` once
        everything that can stop has stopped.
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
        heard = time.monotonic()
        try:
            while not (reader_done and all(lane.finished or lane.abandoned
                                           for lane in self.lanes)):
                try:
                    message = self.outbox.get(timeout=POLL)
                except queue.Empty:
                    message = None
                if time.monotonic() - heard > POLL:  # once a tick, however busy
                    hear_signals_on_main_thread()
                    heard = time.monotonic()
                if isinstance(message, _Finished):
                    self.lanes[message.id].finished = True
                elif isinstance(message, _ReaderDone):
                    reader_done = True
                    if message.error is not None and not cancelled and reader_error is None:
                        reader_error = message.error
                        self.halt()
                elif message is not None:
                    self._deliver(message)
                if not cancelled and self._cancel():
                    cancelled = True
                    deadline = time.monotonic() + CANCEL_GRACE
                    self.halt()
                now = time.monotonic()
                if cancelled and now > deadline and not self._undoing(now - deadline):
                    for lane in self.lanes:
                        lane.abandoned = lane.abandoned or not lane.finished
                    break
                if not cancelled:
                    self._check_stalls(now)
                    if not reader_done and source is not None:
                        reader_error = self._source_stalled(source, now)
                        if reader_error is not None:
                            reader_done = True
                            self.halt()
            self._await_undos()
            self._drain()
        finally:
            # Whatever ends the run (the end, a cancel, an exception from the callback or from
            # cancel()), the threads must not go on: abandoned ones stop when their call returns.
            self.halt()
        if cancelled:
            raise Cancelled("cancelled")
        return reader_error

    def _undoing(self, late: float) -> bool:
        """A lane still writes the stamp back over its head: worth UNDO_GRACE more."""
        return late < UNDO_GRACE and any(lane.undoing and not lane.finished
                                         for lane in self.lanes)

    def _await_undos(self) -> None:
        """Wait for lanes given up with their head at risk to put the stamp back (see the
        module docstring); deliver what they post meanwhile."""
        deadline = time.monotonic() + UNDO_GRACE
        said: set[int] = set()
        while True:
            pending = [lane for lane in self.lanes
                       if lane.abandoned and lane.at_risk and not lane.finished]
            if not pending:
                return
            now = time.monotonic()
            hung = [lane for lane in pending
                    if not lane.undoing and getattr(lane.dest, "in_call", False)]
            if hung:
                deadline = now + UNDO_GRACE  # the call the process waits for anyway
            elif now > deadline:
                for lane in pending:  # no stamp back in time: the result must say so now
                    self._callback(BusWriterMessage.HeadUndone(lane.id, lane.at_risk, False))
                return
            for lane in hung:
                if lane.id not in said:
                    said.add(lane.id)
                    self._callback(Note(
                        f"{getattr(lane.dest, 'path', 'a drive')}: given up inside its head's "
                        "write or read-back; the stamp goes back over the image's head once "
                        "that call returns (the process could not end before it anyway)"))
            hear_signals_on_main_thread()
            try:
                message = self.outbox.get(timeout=POLL)
            except queue.Empty:
                continue
            if isinstance(message, _Finished):
                self.lanes[message.id].finished = True
            elif not isinstance(message, _ReaderDone):
                self._deliver(message)

    def _deliver(self, message: object) -> None:
        if isinstance(message, Late):  # what became of a head: said even for a lane given up
            self._callback(message.message)
            return
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

    def give_up(self, lane_id: int, error: OSError) -> None:
        """Fail a lane from the calling thread (a drive graded out): it is abandoned as a
        stalled one is, starts no other call, and its ``errored`` message follows at once."""
        lane = self.lanes[lane_id]
        if lane.finished or lane.abandoned or lane.error is not None:
            return
        lane.error = error
        lane.abandoned = True
        self._left(lane)
        self._callback(self._errored(lane.id, error))

    def _check_stalls(self, now: float) -> None:
        limit = self._stall_timeout
        if limit is None:
            return
        for lane in self.lanes:
            if lane.finished or lane.abandoned:
                continue
            if lane.source_clock.stalled(now, limit):  # its own reads of the image
                lane.error = SourceStalled(limit, lane.source_clock.recent)
            elif lane.stalled(now, limit):
                lane.error = Stalled(lane.stall_reason(limit))
            else:
                continue
            lane.abandoned = True
            self._left(lane)
            self._callback(self._errored(lane.id, lane.error))

    def _source_stalled(self, source: Clock, now: float) -> SourceStalled | None:
        limit = self._stall_timeout
        if limit is None or not source.stalled(now, limit):
            return None
        return SourceStalled(limit, source.recent, source.spilling)

    def _guard(self, lane: Lane, task: Callable[[Lane], None]) -> None:
        keep_signals_for_main_thread()
        try:
            task(lane)
        except Exception as exc:  # every failure of a destination becomes a message
            if not lane.abandoned:
                lane.error = as_oserror(exc)
                self._left(lane)
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
