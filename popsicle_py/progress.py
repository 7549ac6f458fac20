"""One progress measure per drive: bytes written and verified, time spent, speeds.

Pure code over the job's events (the clock is a parameter), shared by the live views and the
``--report`` sink; it knows nothing of screens, so a job-side sink can use it without a view.

The measure: a flash does two passes over the same bytes, so its total work is the bytes to
write plus the bytes to verify (twice the image, or the block map's mapped bytes; once with
``--no-verify``), and the work done is the bytes written (or found identical) plus the bytes
verified.  The job reports each phase on its own (``Progress(device, phase, done, total)``,
reset at every phase, the first bucket written last); adding them here means the bar never
runs backwards and the total never jumps between phases.  ``verify`` alone has one pass.
When the image's size is unknown (gzip and bzip2 do not record it) there is no total until
the end: the row shows bytes and speed and no invented percentage.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from popsicle_py.events import DriveResult

#: The speed shown is measured over this many seconds (long enough to smooth a bucket's burst).
SPEED_WINDOW = 5.0
#: Phases whose bytes are writes (``syncing`` is the first bucket, written last).
WRITE_PHASES = ("writing", "syncing")
VERIFY_PHASES = ("verifying", "reading")  # reading: ``read``'s one pass


class DriveProgress:
    """Written plus verified bytes of one drive, and its speeds; fed the job's events."""

    def __init__(self, *, writes: bool = True, verifies: bool = True,
                 size: int | None = None) -> None:
        self.writes, self.verifies = writes, verifies
        self.pass_size = size  # bytes of one pass (image or mapped bytes); None: unknown yet
        self.written = 0  # bytes written or found identical, the largest the job reported
        self.verified = 0  # bytes verified, summed over verify passes
        self._pass_done = 0  # of the current verify pass
        self._shown = 0  # never decreases: what the bar shows
        self.phase: str | None = None
        self.ended: str | None = None  # final status once known
        self._since: float | None = None  # start of the current phase
        self.started: float | None = None
        self.finished: float | None = None
        self.write_time = 0.0
        self.verify_time = 0.0
        self.elapsed: float | None = None  # from the first phase to the end (the job's own clock)
        self.moved: float | None = None  # when the work done last grew
        self._samples: deque[tuple[float, int]] = deque()

    # Feeding

    def on_phase(self, phase: str, now: float) -> None:
        self._close_phase(now)
        if self.started is None:
            self.started = now
        self.phase = phase
        self._since = now
        if phase in VERIFY_PHASES:
            self._pass_done = 0
        self._sample(now)

    def on_progress(self, phase: str, done: int, total: int | None, now: float) -> None:
        if self.started is None:
            self.started = now
        if phase in VERIFY_PHASES:
            if not self.writes and total is not None:
                self.pass_size = total
            if done < self._pass_done:  # a new pass without its phase event
                self._pass_done = 0
            self.verified += done - self._pass_done
            self._pass_done = done
        else:
            if total is not None:
                self.pass_size = total
            self.written = max(self.written, done)
        self._sample(now)

    def on_end(self, status: str, now: float, written: int | None = None,
               elapsed: float | None = None) -> None:
        """The drive ended: ``written`` (bytes written plus skipped) fixes an unknown size;
        ``elapsed`` is the job's own measure of the drive's time (its result says it)."""
        if self.ended is not None:
            return
        self._close_phase(now)
        self.ended = status
        self.finished = now
        if elapsed is None and self.started is not None:
            elapsed = now - self.started
        self.elapsed = elapsed
        if written is not None:
            self.written = max(self.written, written)
        self._sample(now)
        if status == "ok":
            if self.pass_size is None:
                self.pass_size = self.written
            total = self.total
            if total is not None:
                self._shown = total

    def on_result(self, r: DriveResult, now: float, *, elapsed: bool = True) -> None:
        """The drive's result: its bytes, its elapsed time (unless ``elapsed`` is False: a
        station's slot times its own) and, where the engine timed them, its passes (their
        messages come in bursts, so a fast drive's pass can look instant here)."""
        self.on_end(r.status, now, r.bytes_written + r.bytes_skipped,
                    r.elapsed if elapsed else None)
        if r.write_seconds is not None:
            self.write_time = r.write_seconds
        if r.verify_seconds is not None:
            self.verify_time = r.verify_seconds

    def _close_phase(self, now: float) -> None:
        if self._since is not None and self.phase is not None:
            spent = max(0.0, now - self._since)
            if self.phase in WRITE_PHASES:
                self.write_time += spent
            elif self.phase in VERIFY_PHASES:
                self.verify_time += spent
        self._since = None

    def _sample(self, now: float) -> None:
        raw = self._raw_done()
        total = self.total
        if total is not None:
            raw = min(raw, total if self.ended == "ok" else max(total - 1, 0))
        if raw > self._shown or self.moved is None:
            self.moved = now
        self._shown = max(self._shown, raw)
        self._samples.append((now, self._shown))
        while len(self._samples) > 2 and now - self._samples[1][0] >= SPEED_WINDOW:
            self._samples.popleft()

    # Reading

    def _raw_done(self) -> int:
        size = self.pass_size
        written = self.written if self.writes else 0
        verified = self.verified if self.verifies else 0
        if size is not None:
            written, verified = min(written, size), min(verified, size)
        return written + verified

    @property
    def total(self) -> int | None:
        if self.pass_size is None:
            return None
        return self.pass_size * (int(self.writes) + int(self.verifies))

    @property
    def done(self) -> int:
        return self._shown

    @property
    def pass_done(self) -> int:
        """Bytes of the current pass (written, then verified): what the byte counts show."""
        if self.ended == "ok" and self.pass_size is not None:
            return self.pass_size
        if self.verifies and (self.phase in VERIFY_PHASES or not self.writes):
            return min(self.verified, self.pass_size or self.verified)
        return self.written

    @property
    def fraction(self) -> float | None:
        total = self.total
        if total is None:
            return None
        return 1.0 if total == 0 else min(1.0, self.done / total)

    def idle(self, now: float) -> float:
        """Seconds since the work done last grew (0 before it started)."""
        return 0.0 if self.moved is None else max(0.0, now - self.moved)

    def speed(self, now: float) -> float | None:
        """Bytes per second over the last few seconds up to ``now``: it falls to 0 while
        nothing moves (never a stale speed); None until there is a span to measure."""
        if self.ended is not None:
            return None
        samples = self._samples
        if not samples or self.started is None:
            return None
        t0, d0 = samples[0]
        for t, d in samples:  # the last sample at or before the window's start
            if now - t < SPEED_WINDOW:
                break
            t0, d0 = t, d
        span = now - t0
        if span < 0.5:
            return None
        return max(0.0, (self.done - d0) / span)

    def eta(self, now: float) -> float | None:
        total, speed = self.total, self.speed(now)
        if total is None or not speed:
            return None
        return max(0.0, (total - self.done) / speed)

    @property
    def write_speed(self) -> float | None:
        """Average over the writing phases: bytes written (or found identical) per second."""
        return self.written / self.write_time if self.write_time > 0 and self.written else None

    @property
    def verify_speed(self) -> float | None:
        return self.verified / self.verify_time if self.verify_time > 0 and self.verified \
            else None

    @property
    def average_speed(self) -> float | None:
        """What a finished row shows: the image's bytes (written or found identical, or read
        for ``verify``) over the drive's whole elapsed time, as its result says it."""
        done = self.written if self.writes else self.verified
        if not self.elapsed or self.elapsed <= 0 or not done:
            return None
        return done / self.elapsed
