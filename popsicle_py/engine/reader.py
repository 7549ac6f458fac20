"""The reader: fills the ring from the source, once, in order.

It keeps the image's head (up to its first 1 MiB: :mod:`.head`) out of the ring for the lanes to
write last, records a digest per extent for verification without a second read, checks
block-map ranges as they pass, and at the end of the source asks the caller to vouch for what
was read (the image's checksum, computed in this same pass).  When the ring is full because one
lane holds it back while another waits for data, it sends that laggard on alone (seekable
sources only).
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import xxhash

from popsicle_py.blockdev import FileLike, read_full
from popsicle_py.buffers import aligned_buffer
from popsicle_py.engine.config import CHUNK, HEAD, LAGGARD_PATIENCE, POLL, Config
from popsicle_py.engine.head import head_length
from popsicle_py.engine.lane import Clock, Lane
from popsicle_py.engine.ring import Ring
from popsicle_py.engine.spill import Spill
from popsicle_py.errors import ExtentChecksumError, SourceChanged, SourceReadFailed
from popsicle_py.messages import BusWriterMessage
from popsicle_py.pacing import Pacer

if TYPE_CHECKING:
    import hashlib

_NOT_SEEKABLE = (AttributeError, OSError, io.UnsupportedOperation, ValueError)


class _Stopped(Exception):
    """The run stopped while the reader was reading: it leaves without another call."""


def pread_source(source: FileLike) -> tuple[int, int] | None:
    """(fd, starting offset) when the source can be re-read by position, else None."""
    try:
        fd = source.fileno()
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            return None
        return fd, source.tell()
    except _NOT_SEEKABLE:
        return None


class Reader:
    """Reads the source into the ring; all its state is set up here, before the run starts."""

    def __init__(self, source: FileLike, ring: Ring, lanes: Sequence[Lane], config: Config,
                 stopped: threading.Event, held: memoryview | None, *, laggards: bool = False,
                 spill: Spill | None = None, post: Callable[[object], None] | None = None
                 ) -> None:
        self.source = source
        self.ring = ring
        self.lanes = lanes
        self.config = config
        self.stopped = stopped  # the run's stop event
        self.held = held  # where the image's head goes (None: it goes through the ring)
        self.held_length = 0  # the head is held[:held_length], holes of a block map zeroed
        self.head_bytes = 0  # of the image in it (a block map's holes are not)
        #: The head's length, decided by the first read (see :func:`.head.head_length`).
        self.head_limit: int | None = None
        self._head_recorded = False
        self.digests: list[bytes] = []
        self.extents: list[tuple[int, int]] = []
        self.total = 0
        self.laggards = laggards  # laggards may leave the ring (until a spill fails)
        self.spill = spill  # where a stream is kept for laggards, if it is
        self.post = post  # the supervisor's outbox, for notes of the reader's own
        self._lag_since: dict[int, float] = {}  # when each lane began to hold the ring back
        self._pos = 0  # where the source is, relative to its start
        self._base = 0
        self._checker: hashlib._Hash | None = None
        #: SHA-256 of the recorded extents in order: once for every drive (issue 30).  Made
        #: as the reading starts, on this thread: loading OpenSSL then overlaps the drives'
        #: probes instead of delaying the start (issue 30).
        self.sha256: hashlib._Hash | None = None
        #: Set while a call on the source is in flight: a source that hangs is seen there.
        self.clock = Clock()
        #: Calls sized to half a second of the source's speed: a slow share is not a hang,
        #: and a stop is seen between calls.
        self.pacer = Pacer()
        #: A source with its own stall rule (a download: read timeouts, resumes) is left to
        #: it: the reader's clock never runs while it is read.
        self.judged = bool(getattr(source, "judges_its_stalls", False))
        if self.judged:  # with the run's stall timeout (a download: see remote.download)
            source.judge_stalls(config.stall_timeout)
        #: Inside :meth:`run`: the source must not be closed under it by another thread (a
        #: stream blocked in a read, a stalled download, could block the closer too).
        self.reading = False

    def _fill(self, view: memoryview) -> int:
        """``read_full`` of the source, paced, on the stall clock."""
        with self.clock.busy(watched=not self.judged):  # a download judges its own stalls
            try:
                got = read_full(self.source, view, pacer=self.pacer,
                                progress=self.clock.advance, stop=self.stopped.is_set)
            except OSError as exc:
                if type(exc) is not OSError:  # already worded (a decoder's, a download's)
                    raise
                end = self._pos + len(view)
                if self.config.expected_size is not None:  # not past the image's end
                    end = max(self._pos + 1, min(end, self.config.expected_size))
                raise SourceReadFailed(self._pos, end - self._pos, exc) from exc
        if self.stopped.is_set():  # what was read may be short of the source: never its end
            raise _Stopped
        return got

    def _reads(self) -> Iterator[tuple[int, int, int | None]]:
        """(offset, most bytes, extent index) of each bucket to read, in source order."""
        size = self.ring.bucket_size
        extents = self.config.extents
        if extents is None:
            offset = 0
            while True:
                yield offset, size, None
                offset += size
        for index, (start, length, _) in enumerate(extents):
            for piece in range(start, start + length, size):
                yield piece, min(size, start + length - piece), index

    def run(self) -> None:
        """Read the source into the ring, to its end or until the run stops."""
        self.reading = True
        try:
            with contextlib.suppress(_Stopped):
                self._run()
        finally:
            self.reading = False

    def _run(self) -> None:
        if self.config.record:
            import hashlib

            self.sha256 = hashlib.sha256()
        if self.config.select is not None:
            if self._run_selected():
                self._end()
            return
        extents = self.config.extents
        ring = self.ring
        if extents is not None:
            try:
                self._base = self.source.tell()
            except _NOT_SEEKABLE:
                self._base = 0
        seq = 0
        for offset, limit, index in self._reads():
            if not self._wait_for_slot(seq):
                return
            buffer = ring.buffer_for(seq)
            view = buffer[:limit]
            if extents is not None:
                self._position(offset, view)
            length = self._fill(view)
            self._pos += length
            if self.spill is not None and length:
                self._spill(seq, offset, view[:length])
            if extents is not None:
                if length < limit:
                    raise SourceChanged(extents[-1][0] + extents[-1][1], offset + length)
                assert index is not None
                self._check_extent(index, offset, view[:length])
            start = self._take_head(view[:length], offset)
            self.total += length
            if start < length:
                self._record_head()
                self._record(offset + start, view[start:length])
                with ring.cond:
                    ring.publish(seq, start, length - start, offset + start)
                if self.sha256 is not None:  # after the publish: the lanes need not wait
                    self.sha256.update(view[start:length])
                seq += 1
            if length < limit:
                break
        if extents is not None and not self._drain():
            return
        self._end()

    def _drain(self) -> bool:
        """Past a block map's last range, a decoded stream is read to its end: only there are
        its own checks made (gzip's CRC and length, xz's and zstd's checksums, trailing
        garbage) and its length compared with the map's.  A file that seeks is not read: its
        size was compared with the map's before the run.  False when the run stopped first."""
        try:
            self.source.seek(0, io.SEEK_END)
            return True
        except _NOT_SEEKABLE:
            pass
        scratch = memoryview(aligned_buffer(CHUNK))
        while not self.stopped.is_set():
            got = self._fill(scratch)
            self._pos += got
            if got < len(scratch):
                expected = self.config.expected_size
                if expected is not None and expected != self._pos:
                    raise SourceChanged(expected, self._pos, "its block map says")
                return True
        return False

    def _end(self) -> None:
        """The source read to its end: its size checked, then vouched for."""
        ring = self.ring
        self._record_head()
        expected = self.config.expected_size
        if self.config.extents is None and expected is not None and expected != self.total:
            raise SourceChanged(expected, self.total)
        with ring.cond:
            ring.total = self.total
            ring.eof = True
            ring.cond.notify_all()
        if self.config.vouch is not None:  # it may look at the file again: on the clock too
            with self.clock.busy():
                self.config.vouch()
        with ring.cond:
            ring.vouched = True
            ring.cond.notify_all()

    def _run_selected(self) -> bool:
        """Read every byte; publish only the runs the selector keeps (one bucket holds one
        run, or part of one).  Dropped runs are read into a buffer of the reader's own, with
        no wait for the lanes.  False when the run stopped first."""
        select = self.config.select
        assert select is not None and self.spill is None, "a selector keeps lanes in lock-step"
        ring, size = self.ring, self.ring.bucket_size
        scratch: memoryview | None = None
        seq = offset = 0
        while True:
            keep, want = select.decide(offset, size)
            if not keep:  # a piece at a time: what it sees may change what follows
                if scratch is None:
                    scratch = memoryview(aligned_buffer(min(size, CHUNK)))
                view = scratch[: min(want, len(scratch))]
                length = self._fill(view)
                select.saw(offset, view[:length])
                offset += length
                self.total += length
                if length < len(view):
                    return True
                if self.stopped.is_set():
                    return False
                continue
            if not self._wait_for_slot(seq):
                return False
            buffer = ring.buffer_for(seq)
            fill = 0
            ended = False
            while keep:
                view = buffer[fill : fill + want]
                length = self._fill(view)
                select.saw(offset + fill, view[:length])
                fill += length
                ended = length < want
                if ended or fill == size:
                    break
                keep, want = select.decide(offset + fill, size - fill)
            data = buffer[:fill]
            start = self._take_head(data, offset)
            self.total += fill
            if start < fill:
                self._record_head()
                self._record(offset + start, data[start:])
                with ring.cond:
                    ring.publish(seq, start, fill - start, offset + start)
                if self.sha256 is not None:  # of the recorded extents (whole when none skipped)
                    self.sha256.update(data[start:])
                seq += 1
            offset += fill
            if ended:
                return True

    def _spill(self, seq: int, offset: int, data: memoryview) -> None:
        """Keep the bucket in the spill file, before any lane can want it from there.

        When that fails, every lane on its own comes back to the ring at this bucket (it reads
        the spill up to here first), and no other lane leaves the ring from now on.
        """
        spill = self.spill
        assert spill is not None
        if spill.stopped is not None:
            return
        # On the stall clock: a spill directory on a hung disk would hold the reader, and
        # with it every drive, for good (each lane waits for data, never a stall).
        self.clock.spilling = spill.directory
        try:
            with self.clock.busy():
                appended = spill.append(offset, data)
        finally:
            self.clock.spilling = None
        if appended:
            return
        with self.ring.cond:
            self.laggards = False
            for lane in self.lanes:
                if lane.solo and lane.error is None and not lane.finished:
                    lane.rejoin = seq
                    self.ring.positions[lane.id] = seq
            self.ring.cond.notify_all()
        if self.post is not None:
            self.post(BusWriterMessage.LockStep(spill.stopped or "the spill file failed"))

    def _take_head(self, data: memoryview, offset: int) -> int:
        """Keep the part of a read that lies in the image's head; return its length.

        Every read inside the head is held, not only the first: small buckets, and block-map
        ranges (an MBR sector, then ISO 9660 descriptors at 32 KiB), would otherwise put part
        of the head on the drives before the rest was checked.  The first read sizes the head
        (up to the first partition, when the image has a partition table: see :mod:`.head`).
        """
        if self.held is None:
            return 0
        if self.head_limit is None:
            self.head_limit = head_length(data) if offset == 0 else HEAD
        limit = self.head_limit
        if offset >= limit:
            if self.held_length < limit and not self._head_recorded:
                # A block map whose holes reach the head's end (or fill it): the image's
                # zeros there, held all the same (stamped first, written last), or the drive
                # keeps the table or signatures it had over the new data.
                self.held_length = limit
            return 0
        assert not self._head_recorded, "reads in order (only_extents checks the ranges)"
        n = min(len(data), limit - offset)
        self.held[offset : offset + n] = data[:n]
        self.held_length = offset + n
        self.head_bytes += n
        return n

    def _record_head(self) -> None:
        """The head's one extent (index 0), recorded before anything that follows it."""
        if self._head_recorded:
            return
        self._head_recorded = True
        expected = self.config.expected_size
        if self.held is not None and self.head_limit is not None and expected is not None \
                and self.config.extents is not None:
            # A block map's last range ends in the head: its holes up to the head's end too.
            self.held_length = max(self.held_length, min(self.head_limit, expected))
        if self.held is not None and self.held_length:
            self._record(0, self.held[: self.held_length])
            if self.sha256 is not None:
                self.sha256.update(self.held[: self.held_length])

    def _record(self, offset: int, data: memoryview) -> None:
        if self.config.record:
            self.digests.append(xxhash.xxh3_128_digest(data))
            self.extents.append((offset, len(data)))

    def _wait_for_slot(self, seq: int) -> bool:
        """Wait until bucket ``seq`` may be filled; False when the run stops first."""
        ring = self.ring
        with ring.cond:
            waited = False
            while not self.stopped.is_set() and not ring.slot_free(seq):
                waited = True
                if self.laggards and self._detach_laggards(seq):
                    continue
                ring.cond.wait(POLL if self.laggards else None)
            if not waited:
                self._lag_since.clear()  # the ring is pacing nobody
            return not self.stopped.is_set()

    def _position(self, offset: int, scratch: memoryview) -> None:
        """Move the source to ``offset``: seek where it can, otherwise read and drop."""
        if offset == self._pos:
            return
        try:
            self.source.seek(self._base + offset)
            self._pos = offset
            return
        except _NOT_SEEKABLE:
            pass
        while self._pos < offset:
            got = self._fill(scratch[: min(len(scratch), offset - self._pos)])
            if not got:
                raise SourceChanged(offset, self._pos)
            self._pos += got

    def _check_extent(self, index: int, offset: int, data: memoryview) -> None:
        """Hash each block-map range as it is read and compare with its expected checksum."""
        assert self.config.extents is not None
        start, length, expected = self.config.extents[index]
        algo = self.config.extent_algo
        if expected is None or algo is None:
            return
        if offset == start:
            import hashlib

            self._checker = hashlib.new(algo)
        assert self._checker is not None, "a range's pieces are read in order"
        self._checker.update(data)
        if offset + len(data) == start + length and self._checker.hexdigest() != expected:
            raise ExtentChecksumError(start, length, algo)

    def _detach_laggards(self, seq: int) -> bool:
        """Let the slowest lanes leave the ring when someone else waits for data.

        Called holding the ring's lock, when bucket ``seq`` has no free slot.  The laggards
        stop holding the ring at once, even while one of them is blocked inside a write: it may
        still be writing from the oldest bucket, so that bucket's memory is left to it and the
        ring gets a fresh buffer with the same bytes in its place.  A lane that holds the others
        back only for a moment (scheduling, a stick's brief pause) stays; one that keeps doing
        so for LAGGARD_PATIENCE goes on alone, so drives of one speed never pay for a second
        read of the source because of jitter.
        """
        ring = self.ring
        now = time.monotonic()
        oldest = seq - len(ring)
        behind = {lid for lid, pos in ring.positions.items() if pos <= oldest}
        for lid in list(self._lag_since):
            if lid not in behind:
                del self._lag_since[lid]  # it caught up: jitter, not a slower drive
        # Held back means caught up and waiting for this very bucket: a lane that is listed
        # as waiting but has buckets to write has simply not been scheduled yet.
        if not any(ring.positions.get(lid, -1) >= seq for lid in ring.starving):
            return False
        for lid in behind:
            self._lag_since.setdefault(lid, now)
        laggards = [lid for lid in behind if now - self._lag_since[lid] >= LAGGARD_PATIENCE]
        if not laggards:
            return False
        for lid in laggards:
            lane = self.lanes[lid]
            lane.detach = True
            lane.solo = True
            del ring.positions[lid]
        ring.replace_slot(seq)
        ring.cond.notify_all()
        return True
