"""How big each system call on a drive is, and how often a failed one is tried again.

Every loop over a drive's calls (:mod:`popsicle_py.blockdev`) is sized by a :class:`Pacer`, so
that no single call outlasts about half a second of the drive's own measured speed: a crawling
stick is seen to make progress, a stall is declared on time and a cancel is honoured at the
next call.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Iterator

#: The largest single read or write (4 MiB at 4 MB/s is one second).
MAX_CALL = 4 << 20
#: The first call of a drive: small enough for a 20 KiB/s stick to answer in under a second.
FIRST_CALL = 16 << 10
#: Calls are whole multiples of this (O_DIRECT needs the logical block size; 4 KiB covers all).
CALL_ALIGN = 4096
#: Each call should take about this long at the drive's measured speed.
CALL_SECONDS = 0.5
#: Write errors worth another try: busy hubs and flaky sticks produce them and then recover.
TRANSIENT = frozenset({errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.EBUSY})
DEFAULT_RETRIES = 5
#: A drive (or source) that moves less than this within the stall timeout is stalled: at
#: 20 KiB/s an image would take days, so crawling is not progress (while any single call
#: still is bounded).
STALL_BYTES = 1 << 20
#: What one small request answered (a capacity probe's single block) counts for: a stick that
#: takes a flash page's time for every small write answers the probe's hundreds of them
#: slowly, and answering 16 within the stall timeout is not a stall.
SMALL_REQUEST = STALL_BYTES // 16
RETRY_BACKOFF = 0.1


class Pacer:
    """Sizes one drive's system calls to about :data:`CALL_SECONDS` of its measured speed.

    Starts at :data:`FIRST_CALL` and at most doubles per call, so a fast drive reaches
    :data:`MAX_CALL` within a few MiB and a slow one never has a call in flight for long.
    """

    def __init__(self, first: int = FIRST_CALL, most: int = MAX_CALL) -> None:
        self._size = first
        self._most = most

    def size(self) -> int:
        return self._size

    def record(self, nbytes: int, seconds: float) -> None:
        if nbytes <= 0:
            return
        rate = nbytes / max(seconds, 1e-6)
        want = min(int(rate * CALL_SECONDS), self._size * 2, self._most)
        self._size = max(CALL_ALIGN, want - want % CALL_ALIGN)


class Clock:
    """How recently a worker moved data: the stall rule reads it, the worker alone sets it."""

    def __init__(self) -> None:
        self.waiting = True  # waiting for another thread, which is never a stall
        self.last_progress = time.monotonic()
        self.recent = 0  # bytes moved since last_progress, short of STALL_BYTES
        self.answers = 0  # small requests answered since last_progress (see answered)
        #: The spill file's directory while the reader writes a bucket there: a stall then
        #: names it, not the image.
        self.spilling: str | None = None

    def touch(self) -> None:
        """A new step begins (or a wait ended): the stall clock starts again."""
        self.last_progress = time.monotonic()
        self.recent = 0
        self.answers = 0

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more were moved; every STALL_BYTES of them count as progress."""
        self.recent += nbytes
        if self.recent >= STALL_BYTES:
            self.touch()

    def answered(self) -> None:
        """One small request came back: worth :data:`SMALL_REQUEST` bytes of progress, and
        counted apart from the bytes, so that a stall says what really moved."""
        self.answers += 1
        if self.recent + self.answers * SMALL_REQUEST >= STALL_BYTES:
            self.touch()

    @contextlib.contextmanager
    def busy(self, watched: bool = True) -> Iterator[None]:
        """A call the stall rule watches (unless ``watched`` is false): the clock starts
        again, and it is waiting once more when the call is over."""
        self.touch()
        self.waiting = not watched
        try:
            yield
        finally:
            self.waiting = True

    def stall_reason(self, limit: float) -> str:
        """Why a worker stalled, from what it moved in the last ``limit`` seconds: one request
        answered before a hang is no progress."""
        if self.recent:
            return (f"stalled: only {self.recent // 1024} KiB in {limit:g} s (a dying or fake "
                    "drive?)")
        if self.answers > 1:
            return (f"stalled: only {self.answers} small requests answered in {limit:g} s "
                    "(a dying or fake drive?)")
        return f"stalled: no progress for {limit:g} s"

    def stalled(self, now: float, limit: float) -> bool:
        """Busy (not waiting) with less than STALL_BYTES moved for more than ``limit`` s."""
        return not self.waiting and now - self.last_progress > limit
