"""Each destination's finishing steps: the stamp, verification from the device, repairs, the head.

:class:`Check` reads a destination back against the digests the reader recorded, rewrites bad
extents when it may and checks *every* extent again after (a write to a drive that aliases
addresses, as counterfeit sticks do, can spoil what was checked before it).  It is the one
routine for the writer's own verification and for :class:`~.verifier.BusVerifier` given digests.

:class:`Finisher` is what a write run does with it, in this order (see :mod:`.writer`):

1. :meth:`Finisher.stamp`: random bytes where the image's head goes, before anything else, so
   that a drive stopped at any later point shows neither the image's head nor what it held
   before (an old image's partition table over new data would pass for a good disk);
2. :meth:`Finisher.finish`, once every other bucket is written and synced: with verification,
   every extent read back and checked, the stamp included (the stamp reading back proves the
   head's blocks are shared with no other checked block, so writing the head next cannot change
   anything already checked); with the surface test, the rest of the drive tested and every
   extent checked once more (the test's writes land on the image on a drive that wraps
   addresses); then, once the reader has vouched for the whole source, the
   caller's per-destination step if any (``Config.before_head``: --customize writes the boot
   partition's files; an exception fails the destination, its head unwritten), the head,
   fsync, and the head read back; then ``Completed``.

From the head's first write until it reads back, a lane that fails (an error, a head that does
not read back) or is stopped (a cancel, a stall) gets the stamp written back over the head
(:meth:`Finisher._undo`, best effort, said in a ``HeadUndone`` message before its failure): a
failed drive never ends holding the image's head, unless the process is killed (SIGKILL) or a
write stays stuck in the kernel past the process's end.  A lane given up meanwhile (a stall, a
cancel's grace over) is :attr:`Lane.at_risk`: its thread still writes the stamp back once its
call returns, the supervisor waits for that and delivers its ``HeadUndone`` (a late message).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator, Sequence

import xxhash

from popsicle_py.blockdev import (
    FileLike,
    drop_cache,
    first_difference,
    read_at,
    sync,
    write_at,
)
from popsicle_py.buffers import aligned_buffer
from popsicle_py.engine import surface
from popsicle_py.engine.checks import EndedEarly, Tap, check_extents
from popsicle_py.engine.config import CHUNK, HEAD, Config
from popsicle_py.engine.lane import Lane
from popsicle_py.engine.reader import Reader
from popsicle_py.engine.ring import Ring
from popsicle_py.engine.spill import Spill
from popsicle_py.errors import SourceDiffers, SourceUnreadable
from popsicle_py.events import Note, Step
from popsicle_py.messages import BusWriterMessage as Msg
from popsicle_py.pacing import CALL_ALIGN, DEFAULT_RETRIES, Pacer
from popsicle_py.records import record

#: Counts ``n`` more bytes of the image as written to a lane (and says so).
Written = Callable[[Lane], Callable[[int], None]]


@record
class Verdict:
    """How a destination read back: the extents still bad, or where it ended too early."""

    bad: tuple[int, ...] = ()
    #: The destination ended at this offset, before an extent did.
    ended: int | None = None
    #: Extents rewritten by repairs (they read back right unless still in ``bad``).
    repaired: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad and self.ended is None


class Check:
    """Read destinations back against per-extent digests; repair bad extents, check all again.

    ``source_bytes(index)`` gives what extent ``index`` should hold (None: it cannot be had);
    ``can_repair(index)`` says whether to try; ``stage(lane, step)`` is told when repairs
    begin writing and checking again.  With ``repairs`` 0 (the verifier) nothing is written.
    """

    def __init__(self, extents: Sequence[tuple[int, int]], digests: Sequence[bytes],
                 bucket_size: int, *, repairs: int = 0,
                 source_bytes: Callable[[int], memoryview | None] | None = None,
                 can_repair: Callable[[int], bool] = lambda index: False,
                 retries: int = DEFAULT_RETRIES,
                 stage: Callable[[Lane, Step], None] = lambda lane, step: None,
                 tap: Callable[[], Tap] | None = None) -> None:
        self.extents = extents
        #: A fresh tap for each pass over the extents (the last whole pass is what counts).
        self.tap = tap
        self.digests = digests
        self.bucket_size = bucket_size
        self.repairs = repairs
        self.source_bytes = source_bytes
        self.can_repair = can_repair
        self.retries = retries
        self.stage = stage

    def run(self, lane: Lane, indices: Sequence[int], progressed: Callable[[int], None], *,
            all_bad: bool = True) -> Verdict:
        """Check ``indices`` (stopping at the first bad one unless ``all_bad``).

        Returns early, with what it found, once the lane is stopped: the caller looks.
        """
        scratch = memoryview(aligned_buffer(min(CHUNK, self.bucket_size)))
        repaired: set[int] = set()
        try:
            bad = check_extents(lane, self.extents, self.digests, indices, scratch, progressed,
                                all_bad=all_bad, tap=self.tap() if self.tap else None)
            attempts = 0
            while bad and not lane.stopped and attempts < self.repairs:
                if not all(self.can_repair(i) for i in bad):
                    break
                attempts += 1
                repaired.update(bad)
                self.stage(lane, Step.WRITING)
                for index in bad:
                    self._rewrite(lane, index)
                sync(lane.dest)
                drop_cache(lane.dest)
                self.stage(lane, Step.VERIFYING)
                # All again: a rewrite may have changed what was checked.
                bad = check_extents(lane, self.extents, self.digests, indices, scratch,
                                    progressed, all_bad=all_bad,
                                    tap=self.tap() if self.tap else None)
        except EndedEarly as exc:
            return Verdict(ended=exc.offset, repaired=len(repaired))
        return Verdict(tuple(bad), None, len(repaired))

    def _rewrite(self, lane: Lane, index: int) -> None:
        data = self.source_bytes(index) if self.source_bytes is not None else None
        if data is None:
            return
        start, length = self.extents[index]
        if xxhash.xxh3_128_digest(data) != self.digests[index]:  # the image changed since
            raise SourceDiffers(start, length)  # (a URL read again): not the drive's fault
        aligned = memoryview(aligned_buffer(length))[:length]
        aligned[: len(data)] = data
        # Not counted in ``done`` (bytes of the image written): those were counted once already,
        # and a drive that fails while repaired must not look as if it got more than the image.
        write_at(lane.dest, start, aligned[: len(data)], stop=lambda: lane.stopped,
                 retries=self.retries, pacer=lane.pacer)


class Finisher:
    """The finishing steps of every destination of one write run (see the module docstring)."""

    def __init__(self, config: Config, ring: Ring, reader: Reader, held: memoryview | None,
                 pread: tuple[int, int] | None, spill: Spill | None, written: Written) -> None:
        self.config = config
        self.ring = ring
        self.reader = reader
        self.held = held
        self.pread = pread  # the source (or its spill) by position, for repairs
        self.spill = spill
        self.written = written
        #: Where the head goes until the image's own may be written (random: no signature).
        self.stamp_bytes = memoryview(aligned_buffer(HEAD))
        self.stamp_bytes[:] = os.urandom(HEAD)
        #: Per lane: the image range's SHA-256, once a whole verify pass read every extent right.
        self.device_sha256: dict[int, str] = {}

    def stamp(self, lane: Lane) -> bool:
        """The stamp in the head's place, once the first bucket says how long the head is."""
        ring = self.ring
        if not ring.wait_until(lane, lambda: ring.head > 0 or ring.eof):
            return False
        head = self.reader.held_length
        if head:
            # Moved bytes for the stall clock (1 MiB at a crawl is seen as a crawl).
            write_at(lane.dest, 0, self.stamp_bytes[:head], stop=lambda: lane.stopped,
                     progress=lane.advance, retries=self.config.retries, pacer=lane.pacer)
            sync(lane.dest)  # on the device before anything after it (a buffered destination)
        return not lane.stopped

    def finish(self, lane: Lane) -> None:
        """[Verify,] wait for the reader to vouch, write the head [and check it], Completed."""
        config = self.config
        head = self.reader.held_length
        held = self.held[:head] if self.held is not None else None
        stamped = held is not None and head > 0  # since the start (see stamp)
        if config.verify and (lane.stopped or not self._verify(lane, stamp_head=stamped)):
            return
        lane.enter(None)  # the surface test, the source's vouch and the settings: no pass
        if config.surface and config.verify and self._surface(lane):
            # Its writes past the image may have landed on it (a drive that wraps addresses):
            # the image is read back whole again, and only this pass vouches for the drive.
            self.device_sha256.pop(lane.id, None)
            if lane.stopped or not self._verify(lane, stamp_head=stamped, again=True):
                return
        if not self.ring.wait_until(lane, lambda: self.ring.vouched):
            return
        if config.before_head is not None and not lane.stopped:
            lane.touch()
            config.before_head(lane.dest, lane.advance, lambda: lane.stopped)  # raises: fails it
            lane.touch()
        if lane.stopped:  # before the head's first write: nothing to put back
            return
        if held is not None and head:
            lane.stage(Step.SYNCING)
            lane.head_from = head  # nothing of it written yet
            lane.at_risk = head  # a failure (or a stop) from here on undoes it
            try:
                good = self._head(lane, held) and not lane.stopped
            except Exception:
                self._undo(lane)
                raise
            if not good:
                self._undo(lane)
                return
            lane.at_risk = 0
        # A head that read back while not stopped: done, even if the run stops right now.
        lane.post(Msg.Completed(lane.id, self.device_sha256.get(lane.id)
                                if config.verify else None,
                                lane.spent(Step.WRITING, Step.SYNCING),
                                lane.spent(Step.VERIFYING) if config.verify else None))

    def _surface(self, lane: Lane) -> bool:
        """The rest of the drive tested (raises Rejected: the drive never gets the head);
        whether anything was written."""
        size = getattr(lane.dest, "size", None)
        if not isinstance(size, int) or not size:
            return False
        image_end = max([start + length for start, length in self.reader.extents]
                        + [self.config.expected_size or 0])
        first, last = surface.tested_range(image_end, size)
        if first >= last:
            return False
        lane.post(Note(f"{getattr(lane.dest, 'path', 'the drive')}: surface test of bytes "
                       f"{first}-{last - 1}"))
        surface.run(lane, image_end, size, self.config.retries)
        return True

    def _image_sha256(self) -> str | None:
        """The SHA-256 of the image's range, when the extents cover it from byte 0 to its end
        without a hole (not a block map's, nor one at its end: that would be a prefix's
        SHA-256), as the reader computed it once, reading it.  A drive whose
        every extent read back with the image's XXH3-128 holds exactly those bytes: one
        SHA-256 per drive cost a core and a half of CPU at 32 drives and made their
        verification CPU-bound (issue 30)."""
        reader = self.reader
        if reader.sha256 is None or not self.ring.eof or not reader.extents:
            return None
        at = 0
        for start, length in reader.extents:
            if start != at:
                return None
            at += length
        end = self.config.expected_size
        if end is None and self.config.extents is not None:
            return None  # a block map's image may go on past its last range
        return reader.sha256.hexdigest() if at == (reader.total if end is None else end) else None

    def _head(self, lane: Lane, held: memoryview) -> bool:
        """Write the head, fsync, [check it]; False when stopped or it does not read back.

        Written from its end back to byte 0 (:func:`_backwards`), so that a stop is seen
        within one call whatever the calls before were, and the partition table lands last.
        """
        config = self.config
        def began(start: int) -> None:
            lane.head_from = start

        if not _backwards(lane.dest, held, stop=lambda: lane.stopped, progress=lane.advance,
                          retries=config.retries, began=began):
            return False
        sync(lane.dest)
        if lane.stopped:
            return False
        self.written(lane)(self.reader.head_bytes)  # of the image (a block map's holes: not)
        return not (config.verify and not self._verify(lane, only_head=True))

    def _undo(self, lane: Lane) -> None:
        """The stamp back over the head of a lane that failed or stopped once its head was
        being written (best effort, never stopped: it is what makes the drive safe).

        Only over what the head's writes began to cover (below :attr:`Lane.head_from` the
        drive still holds the first stamp), from there up: the partition table first when the
        whole head was written, so that a process killed meanwhile leaves it stamped.  A call
        that fails is skipped, not the end of it: the blocks past it still take the stamp (a
        bad first block, where a head that failed stopped, left all the rest of the image's
        head in place); a second failure ends it (a drive that is gone).
        """
        if not lane.at_risk:
            return
        head = self.reader.held_length
        lane.undoing = True
        try:
            done = _stamp_over(lane.dest, self.stamp_bytes[:head], min(lane.head_from, head))
        except Exception:  # a pulled or dying drive: said in the result
            done = False
        finally:
            lane.undoing = False
        # Late: said even when the lane was given up (a stall) while the head was at risk.
        lane.post(Msg.HeadUndone(lane.id, head, done), late=True)
        lane.at_risk = 0

    def _verify(self, lane: Lane, *, stamp_head: bool = False, only_head: bool = False,
                again: bool = False) -> bool:
        """Check the destination against the digests; repair, then check all again.

        With ``stamp_head`` the head's place must hold the stamp; with ``only_head`` only the
        head is checked.  False (and an ``Invalid`` or error posted) when it does not read back.
        ``again``: the pass after the surface test, which changed nothing of the image on a
        sound drive: no repairs, and a difference raises :func:`surface.image_changed`.
        """
        reader = self.reader
        extents, digests = list(reader.extents), list(reader.digests)
        if stamp_head and reader.held_length > 0:
            digests[0] = xxhash.xxh3_128_digest(self.stamp_bytes[: extents[0][1]])
        indices = [0] if only_head else list(range(len(extents)))
        drop_cache(lane.dest)
        lane.stage(Step.VERIFYING)
        read = [0]

        def progressed(n: int) -> None:
            read[0] += n
            lane.post(Msg.Verified(lane.id, read[0]))

        check = Check(extents, digests, self.config.bucket_size,
                      repairs=0 if again else self.config.repairs,
                      source_bytes=lambda index: self._source_bytes(index, stamp_head, lane),
                      can_repair=self._can_repair, retries=self.config.retries,
                      stage=lambda lane, step: lane.stage(step))
        verdict = check.run(lane, indices, progressed)
        if verdict.ended is not None:
            if again:
                raise surface.image_changed(verdict.ended, ended=True)
            self._invalid(lane, verdict.ended, None, ended=True)
            return False
        if lane.stopped:
            return False
        if verdict.bad:
            start, length = extents[verdict.bad[0]]
            exact = self._exact(lane, verdict.bad[0], stamp_head)
            if again:
                raise surface.image_changed(start if exact is None else exact)
            self._invalid(lane, start if exact is None else exact,
                          None if exact is not None else start + length)
            return False
        if not only_head:  # every extent read back right, in this last whole pass
            digest = self._image_sha256()
            if digest is not None:
                self.device_sha256[lane.id] = digest
        if verdict.repaired:
            lane.repaired += verdict.repaired
            lane.post(Msg.Repaired(lane.id, verdict.repaired))
        return True

    def _invalid(self, lane: Lane, offset: int, end: int | None, *, ended: bool = False) -> None:
        self._undo(lane)  # a head that does not read back is not left on the drive
        lane.mismatch = offset
        lane.error = OSError(errno.EIO, "verification failed")
        self.ring.leave(lane.id)
        lane.post(Msg.Invalid(lane.id, offset, end, ended))

    def _source_bytes(self, index: int, stamp_head: bool, lane: Lane | None = None
                      ) -> memoryview | None:
        """What extent ``index`` should hold, when it can be had without a second decompression
        (the head or stamp from memory, a raw source by position), else from ``source_at``:
        timed on ``lane``'s source clock, as a laggard's reads are (a URL downloaded again
        that hangs is the image's stall, not the drive's)."""
        start, length = self.reader.extents[index]
        if index == 0 and self.reader.held_length:
            assert self.held is not None
            return (self.stamp_bytes if stamp_head else self.held)[:length]
        try:  # a failure here is the image's (or its spill's), not the drive's
            if self.pread is not None and (self.spill is None
                                           or start + length <= self.spill.end):
                fd, base = self.pread
                buf = memoryview(aligned_buffer(length))[:length]
                got = os.preadv(fd, [buf], base + start)
                return buf[:got]
            if self.config.source_at is not None:
                with _on_source_clock(lane):
                    return memoryview(self.config.source_at(start, length))
        except OSError as exc:
            raise SourceUnreadable(exc, start, "the image" if self.spill is None else
                                   f"the image's spill file in {self.spill.directory}") from exc
        return None

    def _can_repair(self, index: int) -> bool:
        return (index == 0 and self.reader.held_length > 0) or self.pread is not None \
            or self.config.source_at is not None

    def _exact(self, lane: Lane, index: int, stamp_head: bool) -> int | None:
        """The first bad byte of a bad extent, when the source can be read by position."""
        if not ((index == 0 and self.reader.held_length) or self.pread is not None):
            return None
        want = self._source_bytes(index, stamp_head)
        if want is None:
            return None
        start, _ = self.reader.extents[index]
        mine = memoryview(aligned_buffer(len(want)))[: len(want)]
        try:
            got = read_at(lane.dest, start, mine)
        except OSError:
            return None
        diff = first_difference(want[:got], mine[:got])
        if diff >= 0:
            return start + diff
        return start + got if got < len(want) else None


@contextlib.contextmanager
def _on_source_clock(lane: Lane | None) -> Iterator[None]:
    """A read of the image for ``lane`` alone: the lane waits meanwhile, its source clock
    is watched (see :func:`.alone.read_alone`)."""
    if lane is None:
        yield
        return
    lane.waiting = True
    try:
        with lane.source_clock.busy():
            yield
    finally:
        lane.waiting = False
        lane.touch()


#: Failed calls after which putting the stamp back gives up (a drive that is gone).
UNDO_FAILURES = 2


def _stamp_over(dest: FileLike, stamp: memoryview, floor: int) -> bool:
    """Write ``stamp[floor:]`` at byte ``floor`` of ``dest``, from there up, in calls of a
    fresh pacer, skipping a call that fails (up to :data:`UNDO_FAILURES`); then flush.
    True when every call and the flush succeeded."""
    pacer = Pacer()
    at = floor - floor % CALL_ALIGN
    failed = 0
    while at < len(stamp):
        end = min(len(stamp), at + pacer.size())
        try:
            write_at(dest, at, stamp[at:end], retries=1, pacer=pacer)
        except OSError:
            failed += 1
            if failed >= UNDO_FAILURES:
                return False
        at = end
    sync(dest)
    return not failed


def _backwards(dest: FileLike, data: memoryview, *, stop: Callable[[], bool],
               progress: Callable[[int], None] | None = None, retries: int,
               began: Callable[[int], None] | None = None) -> bool:
    """Write ``data`` at byte 0 of ``dest`` from its end back, in calls of a fresh pacer (the
    first is 16 KiB, each about half a second of the drive's speed at most); ``began(start)``
    before each.  False once ``stop()`` said so; raises at the first call that fails."""
    pacer = Pacer()
    end = len(data)
    while end > 0:
        if stop():
            return False
        start = max(0, end - pacer.size())
        start -= start % CALL_ALIGN
        if began is not None:
            began(start)
        write_at(dest, start, data[start:end], stop=stop, progress=progress, retries=retries,
                 pacer=pacer)
        end = start
    return True
