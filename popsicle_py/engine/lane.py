"""One destination's thread as the supervisor, the ring and the finishing steps see it."""

from __future__ import annotations

import queue
import threading
import time

from popsicle_py.blockdev import FileLike
from popsicle_py.events import Step
from popsicle_py.messages import BusWriterMessage
from popsicle_py.pacing import Clock, Pacer
from popsicle_py.records import record

__all__ = ["Clock", "Lane", "Late"]


@record
class Late:
    """A lane's message delivered even once the lane was given up (what became of its head)."""

    message: object


class Lane(Clock):
    """One destination's thread, as the supervisor sees it.  Its state is all declared here."""

    def __init__(self, index: int, dest: FileLike, outbox: queue.SimpleQueue[object],
                 stop: threading.Event) -> None:
        super().__init__()
        self.id = index
        self.dest = dest
        self.done = 0  # bytes written (or read back, for a verifier)
        self.skipped = 0  # bytes left alone because the destination held them already
        self.repaired = 0
        self.mismatch: int | None = None
        self.error: OSError | None = None
        self.finished = False  # its thread returned
        self.abandoned = False  # the supervisor gave up on it
        self.detach = False  # asked to leave the ring and go on alone
        self.solo = False  # reading the source by position on its own
        self.rejoin: int | None = None  # the bucket where a solo lane must come back to the ring
        self.undoing = False  # writing the stamp back over a head: a cancel waits for it
        #: The head's length while it is being written or read back (0: not): given up now,
        #: its thread still puts the stamp back once its call returns, and the run waits for
        #: that (see Supervisor).
        self.at_risk = 0
        #: The lowest byte of the head a write has begun at (the head goes from its end back):
        #: below it the drive still holds the stamp, so the undo need not write there.
        self.head_from = 0
        self.pacer = Pacer()
        #: Its own reads of the image while it goes on alone (solo): that time is the image's,
        #: not the drive's, and a stall there is the image's (see Supervisor).
        self.source_clock = Clock()
        self.source_pacer = Pacer()
        #: Seconds it waited for the image (the ring's next bucket, its own reads of it): the
        #: image's time, not the drive's, which --min-write-speed judges.
        self.starved = 0.0
        self.thread: threading.Thread | None = None
        #: Seconds spent in each of its steps, timed on its own thread: the supervisor
        #: delivers messages in bursts, and a fast drive's whole pass can fit in one.
        self.seconds: dict[Step, float] = {}
        self._step: tuple[Step | None, float] | None = None
        self._outbox = outbox
        self._stop = stop

    def enter(self, step: Step | None) -> None:
        """Time ``step`` from now on (None: time nothing), closing the one before; posting it
        is the caller's."""
        now = time.monotonic()
        if self._step is not None:
            before, since = self._step
            if before is not None:
                self.seconds[before] = self.seconds.get(before, 0.0) + (now - since)
        self._step = (step, now)

    def stage(self, step: Step) -> None:
        """Enter ``step`` and tell the supervisor (a writer's lane)."""
        self.enter(step)
        self.post(BusWriterMessage.Stage(self.id, step))

    def spent(self, *steps: Step) -> float:
        """Seconds spent so far in ``steps``, the current one up to now."""
        total = sum(self.seconds.get(step, 0.0) for step in steps)
        if self._step is not None and self._step[0] in steps:
            total += time.monotonic() - self._step[1]
        return total

    @property
    def stopped(self) -> bool:
        """The run is ending or this lane was given up: do not start another system call."""
        return self._stop.is_set() or self.abandoned

    def post(self, message: object, *, late: bool = False) -> None:
        """Hand a message to the supervisor; ``late``: delivered even if the lane was given up."""
        self._outbox.put(Late(message) if late else message)
