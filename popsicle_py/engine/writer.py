"""BusWriter: read a source once and write it to many destinations in parallel.

The builder methods only replace a frozen :class:`~popsicle_py.engine.config.Config`; ``write()``
makes a :class:`_WriteRun`, which owns everything of one run from its constructor: the ring,
the reader, the supervisor and its lanes.

With :meth:`BusWriter.finish_each`, each destination is also finished by the engine, on its own
timeline, in this order, so that a drive is never reported complete unless the bytes on it at
the end are the image's, and never looks like the image to a computer before that:

1. a random stamp where the image's head (its first 64 KiB) goes, before anything else: a
   drive stopped at any later point shows neither the image's head nor what it held before
   (an old image's partition table over new data would pass for a good disk);
2. every bucket but the head, then fsync;
3. with verification: every extent read back from the device and checked against the
   digests the reader recorded, the stamp included.
   Bad buckets are rewritten and then *every* extent is checked again (a write to a drive that
   aliases addresses, as counterfeit sticks do, can spoil what was checked before it).  The
   stamp reading back proves that the head's blocks are shared with no other checked block, so
   writing the head next cannot change anything already checked;
4. once the reader has vouched for the whole source (its checksum, computed in the same pass):
   the head, fsync, and the head read back.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import xxhash

from popsicle_py.blockdev import (
    drop_cache,
    first_difference,
    holds,
    read_at,
    seek,
    sync,
    write_all,
    write_at,
)
from popsicle_py.buffers import aligned_buffer, is_aligned
from popsicle_py.engine.builder import Builder
from popsicle_py.engine.checks import EndedEarly, check_extents
from popsicle_py.engine.config import CHUNK, HEAD, POLL, Config, Extent, Prepare, SourceAt
from popsicle_py.engine.reader import Reader, pread_source
from popsicle_py.engine.results import DestinationResult, WriteResult
from popsicle_py.engine.ring import Ring
from popsicle_py.engine.spill import Spill
from popsicle_py.engine.supervisor import Callback, CancelCheck, Lane, Supervisor
from popsicle_py.errors import AllDestinationsFailed, SourceChanged, SourceDiffers
from popsicle_py.events import Step
from popsicle_py.messages import BusWriterMessage as Msg


class BusWriter(Builder):
    """Read ``source`` once and write it to every destination in parallel.

    ``callback`` receives :class:`~popsicle_py.messages.BusWriterMessage` values on the calling
    thread; ``cancel()`` is polled at least every 100 ms.

    Every drive at its own speed: a destination that keeps a caught-up one waiting for
    ``LAGGARD_PATIENCE`` while a full ring behind leaves the ring and reads the rest of a
    seekable file source with ``os.preadv`` into a 4 MiB buffer of its own (served by the
    page cache for images that fit in memory).  A stream source (a decompressor, a pipe)
    cannot be re-read, so its destinations stay in lock-step with the slowest one.  Memory
    is bounded either way: (buckets + 1) x bucket size, plus 4 MiB per solo destination.
    """

    def __init__(self, source: Any, destinations: Sequence[Any], callback: Callback,
                 cancel: CancelCheck) -> None:
        super().__init__(source, destinations, callback, cancel)
        self._run: _WriteRun | None = None

    # Builder methods (the seed's API, chainable).
    def with_bucket(self, buffer: Any) -> BusWriter:
        """Use the caller's buffer as a bucket: its length sets the bucket size.

        A page-aligned writable buffer (an ``mmap``) becomes the ring's first bucket and no
        memory is allocated for it; any other buffer (a ``bytearray`` is not guaranteed to be
        aligned) sets only the size, so that O_DIRECT destinations always get aligned memory.
        """
        size = len(memoryview(buffer).cast("B"))
        if size <= 0:
            raise ValueError("the bucket buffer is empty")
        return self._set(bucket_size=size, bucket=buffer if is_aligned(buffer) else None)

    def expect_size(self, size: int | None) -> BusWriter:
        """Fail the run if the source does not hold exactly ``size`` bytes."""
        return self._set(expected_size=size)

    def retries(self, count: int) -> BusWriter:
        """How often a transient write error (EIO, EAGAIN, ETIMEDOUT, EBUSY) is retried."""
        return self._set(retries=max(0, count))

    def record_digests(self, enabled: bool = True) -> BusWriter:
        """Record an XXH3-128 digest per extent (``WriteResult.extents``: a bucket, or the held
        head), for :meth:`BusVerifier.with_digests` given those extents."""
        return self._set(record=enabled)

    def first_bucket_last(self, enabled: bool = True) -> BusWriter:
        """Keep the image's head (its first 64 KiB, over as many reads) out of the writes.

        It is returned in ``WriteResult.held`` for the caller to write last, or written last by
        the engine itself with :meth:`finish_each`.  Needs seekable destinations.
        """
        return self._set(hold_head=enabled)

    def only_extents(self, extents: Sequence[Extent], algo: str | None = None) -> BusWriter:
        """Read and write only these (offset, length, checksum) ranges, in order.

        For sparse images with a block map.  Each range is checked against its hex checksum
        (in ``algo``) as it is read; a mismatch fails the run like a source error.
        Destinations stay in lock-step (a laggard's own reads would not follow the ranges).
        Raises ValueError for ranges out of order or overlapping (the head is held by offset).
        """
        ranges = tuple(extents)
        ends = 0
        for offset, length, _ in ranges:
            if offset < ends or length <= 0:
                raise ValueError(f"extents must be in order, not overlapping, and not empty: "
                                 f"({offset}, {length}) after byte {ends}")
            ends = offset + length
        return self._set(extents=ranges, extent_algo=algo)

    def skip_identical(self, enabled: bool = True) -> BusWriter:
        """Read what each destination holds first and write only the chunks that differ."""
        return self._set(skip_identical=enabled)

    def laggards(self, enabled: bool = True) -> BusWriter:
        """Let a destination a full ring behind go on alone (seekable file sources only)."""
        return self._set(laggards=enabled)

    def vouch(self, check: Callable[[], None] | None) -> BusWriter:
        """Call ``check()`` once the source is read to its end; it raises if it cannot vouch.

        With :meth:`finish_each`, no destination gets the image's head before it returned.
        """
        return self._set(vouch=check)

    def spill_to(self, directory: str | None) -> BusWriter:
        """Let the destinations of a stream (a decompressor) go at their own pace.

        The stream is also written to a spill file under ``directory`` ("" for $TMPDIR or
        /var/tmp), from which a laggard reads by position (see :mod:`.spill`).  None: never;
        destinations of a stream then stay in lock-step with the slowest.
        """
        return self._set(spill_dir=directory)

    def prepare_each(self, prepare: Prepare | None) -> BusWriter:
        """Run ``prepare(destination)`` on its own thread before writing it (a capacity probe).

        An OSError fails that destination before anything of the source is written to it.
        """
        return self._set(prepare=prepare)

    def before_head_each(self, step: Prepare | None) -> BusWriter:
        """Run ``step(destination)`` once it is written and verified, before its head.

        With :meth:`finish_each` only.  An exception fails that destination, head unwritten.
        """
        return self._set(before_head=step)

    def finish_each(self, *, verify: bool = True, repairs: int = 1,
                    source_at: SourceAt | None = None) -> BusWriter:
        """Finish each destination in the engine: [verify,] the head last, then ``Completed``.

        See the module docstring for the order.  ``repairs`` bounds how often bad buckets are
        rewritten; their bytes come from the source by position, or from ``source_at``.
        """
        return self._set(pipeline=True, verify=verify, repairs=max(0, repairs),
                         source_at=source_at, hold_head=True, record=True)

    def reading(self) -> bool:
        """The reader is still inside a read of the source (given up on after a cancel).

        Such a source must not be closed by another thread: a stream blocked in a read (a
        stalled download) could block the closer too.  It is left to the reader.
        """
        return self._run is not None and self._run.reading

    def source_read(self) -> WriteResult:
        """What the source gave so far (size, digests, held head), without any results."""
        if self._run is None:
            return WriteResult((), 0, self.config.bucket_size)
        return self._run.source_read()

    def write(self) -> WriteResult:
        """Run to the end; returns every destination's result.

        Raises :class:`~popsicle_py.errors.Cancelled` when cancelled, the source's error when
        reading it failed (no destination then completed), and
        :class:`~popsicle_py.errors.AllDestinationsFailed` when none succeeded.
        """
        if self.config.hold_head:
            for dest in self.destinations:
                if not (hasattr(dest, "seek") and (not hasattr(dest, "seekable")
                                                   or dest.seekable())):
                    raise ValueError("first_bucket_last needs seekable destinations")
        run = _WriteRun(self.source, self.destinations, self.callback, self.cancel, self.config)
        self._run = run
        self._attach(run.supervisor.outbox)
        return run.run()


class _ReadAlone:
    """What one lane read of the source on its own, bucket by bucket, with XXH3 digests.

    The others were fed by the reader, whose digests the lane's must match before its head is
    written: a file changed between the two reads must not reach one drive unseen (with or
    without verification, which would only call it a mismatch).
    """

    def __init__(self, bucket_size: int) -> None:
        self.bucket_size = bucket_size
        self.start: int | None = None  # of the bucket being read
        self.hasher = xxhash.xxh3_128()
        self.buckets: list[tuple[int, int, bytes]] = []  # (offset, length, digest) of each

    def end_of(self, offset: int) -> int:
        """Where the reader's bucket holding ``offset`` ends (after the head, whole buckets)."""
        return (offset // self.bucket_size + 1) * self.bucket_size

    def begin(self, start: int, prefix: memoryview) -> None:
        """A bucket begun from the ring (what it gave is the reader's own bytes)."""
        self.start = start
        self.hasher = xxhash.xxh3_128()
        self.hasher.update(prefix)

    def feed(self, offset: int, data: memoryview) -> None:
        """Bytes read alone at ``offset`` (split here at the reader's bucket ends)."""
        while len(data):
            if self.start is None:
                self.start = offset
                self.hasher = xxhash.xxh3_128()
            end = self.end_of(self.start)
            piece = data[: end - offset]
            self.hasher.update(piece)
            offset += len(piece)
            data = data[len(piece) :]
            if offset == end:
                self.close(offset)

    def close(self, end: int) -> None:
        """The bucket being read ends at ``end`` (its own end, or the source's)."""
        if self.start is not None and end > self.start:
            self.buckets.append((self.start, end - self.start, self.hasher.digest()))
        self.start = None

    def differing(self, extents: Sequence[tuple[int, int]], digests: Sequence[bytes]
                  ) -> tuple[int, int] | None:
        """The first bucket read alone that the reader read otherwise (or never), if any."""
        known = {offset: (length, digest)
                 for (offset, length), digest in zip(extents, digests, strict=True)}
        for offset, length, digest in self.buckets:
            if known.get(offset) != (length, digest):
                return offset, length
        return None


class _WriteRun:
    """One run of a BusWriter: all of its state, declared here."""

    def __init__(self, source: Any, destinations: Sequence[Any], callback: Callback,
                 cancel: CancelCheck, config: Config) -> None:
        self.config = config
        self.source = source
        self.supervisor = Supervisor(destinations, callback, cancel,
                                     stall_timeout=config.stall_timeout,
                                     errored=Msg.Errored, name="writer")
        self.lanes = self.supervisor.lanes
        first = memoryview(config.bucket).cast("B") if config.bucket is not None else None
        self.ring = Ring(config.buckets, config.bucket_size, first)
        self.held = memoryview(aligned_buffer(HEAD)) if config.hold_head else None
        lock_step = not config.laggards or config.extents is not None
        self.pread = None if lock_step else pread_source(source)
        self.reader = Reader(source, self.ring, self.lanes, config, self.supervisor.stop,
                             self.held)
        self.spill: Spill | None = None
        if self.pread is None and not lock_step and config.spill_dir is not None:
            made = Spill.create(config.spill_dir or None, config.expected_size)
            if isinstance(made, Spill):
                self.spill = made
                self.pread = (made.fd, 0)
                self.reader.spill = made
            else:
                self.supervisor.outbox.put(Msg.LockStep(made))
        self.reader.post = self.supervisor.outbox.put
        self.reader.laggards = self.pread is not None
        #: Where the head goes until the image's own may be written (random: no signature).
        self.stamp = memoryview(aligned_buffer(HEAD))
        self.stamp[:] = os.urandom(HEAD)
        self.reading = False
        self._spill_orphaned = False
        self._spill_lock = threading.Lock()
        self._running = len(self.lanes)  # lane threads not yet returned
        #: Each lane's reads on its own, checked before its head (only with recorded digests).
        self.alone = {lane.id: _ReadAlone(config.bucket_size) for lane in self.lanes}
        self.supervisor.wake = self._wake
        self.supervisor.on_leave = self._leave_failed
        for lane in self.lanes:
            self.ring.positions[lane.id] = 0

    def _read(self) -> None:
        self.reading = True
        try:
            self.reader.run()
        finally:
            self.reading = False

    def _close_spill(self) -> None:
        """Close the spill once no lane can read it; an abandoned one closes it when it ends
        (its descriptor's number must not be reused under a lane still reading)."""
        spill = self.spill
        assert spill is not None
        with self._spill_lock:
            if self._running == 0:
                spill.close()
            else:
                self._spill_orphaned = True

    def _task(self, lane: Lane) -> None:
        try:
            self._lane(lane)
        finally:
            with self._spill_lock:
                self._running -= 1
                if self._running == 0 and self._spill_orphaned and self.spill is not None:
                    self.spill.close()

    def _wake(self) -> None:
        with self.ring.cond:
            self.ring.cond.notify_all()

    def _leave_failed(self, lane: Lane) -> None:
        """A failed or given-up lane stops holding the ring; with none left, reading stops."""
        with self.ring.cond:
            self.ring.leave(lane.id)
        if all(other.error is not None for other in self.lanes):
            self.supervisor.halt()

    def run(self) -> WriteResult:
        try:
            error = self.supervisor.run(self._task, self._read)
        finally:
            if self.spill is not None:
                self._close_spill()
        if error is not None:
            raise error
        results = tuple(DestinationResult(lane.id, lane.done, lane.error, lane.skipped,
                                          lane.repaired, lane.mismatch) for lane in self.lanes)
        result = replace(self.source_read(), results=results)
        self.ring.release()  # the caller's own bucket (an mmap) may be closed now
        if all(r.error is not None for r in results):
            raise AllDestinationsFailed(results)
        return result

    def source_read(self) -> WriteResult:
        reader = self.reader
        held = self.held[: reader.held_length] if self.held is not None else None
        return WriteResult((), self.ring.total or 0, self.config.bucket_size,
                           tuple(reader.digests), held, tuple(reader.extents))

    # ------------------------------------------------------------------------------------------
    # One lane, on its own thread.

    def _lane(self, lane: Lane) -> None:
        config = self.config
        if config.prepare is not None:
            lane.waiting = False
            lane.touch()
            config.prepare(lane.dest)
            lane.touch()
            lane.post(Msg.Stage(lane.id, Step.WRITING))
        if config.pipeline and self.held is not None and not self._stamp_head(lane):
            return
        resume = self._from_ring(lane)
        while resume is not None and not lane.stopped:
            rejoin = self._solo(lane, resume)
            if rejoin is None:
                break
            lane.detach = lane.solo = False  # the spill stopped: back to the ring
            resume = self._from_ring(lane, rejoin)
        if lane.stopped:
            return
        with self.ring.cond:
            self.ring.leave(lane.id)
        sync(lane.dest)
        if lane.stopped or not self._check_alone(lane):
            return
        if config.pipeline:
            self._finish(lane)
        elif not lane.stopped:
            lane.post(Msg.Completed(lane.id))

    def _stamp_head(self, lane: Lane) -> bool:
        """The stamp in the head's place, once the first bucket says how long the head is."""
        if not self._wait_for(lane, lambda: self.ring.head > 0 or self.ring.eof):
            return False
        head = self.reader.held_length
        if head:
            write_at(lane.dest, 0, self.stamp[:head], stop=lambda: lane.stopped,
                     retries=self.config.retries, pacer=lane.pacer)
            sync(lane.dest)  # on the device before anything after it (a buffered destination)
        return not lane.stopped

    def _check_alone(self, lane: Lane) -> bool:
        """What the lane read on its own matches what the reader read (once it read it all)."""
        alone = self.alone[lane.id]
        if not alone.buckets or not self.config.record:
            return True
        if not self._wait_for(lane, lambda: self.ring.eof):
            return False
        differs = alone.differing(self.reader.extents, self.reader.digests)
        if differs is not None:
            raise SourceDiffers(*differs)
        return True

    def _written(self, lane: Lane) -> Callable[[int], None]:
        def progressed(n: int) -> None:
            lane.done += n
            lane.advance(n)
            lane.post(Msg.Written(lane.id, lane.done))
        return progressed

    def _from_ring(self, lane: Lane, seq: int = 0) -> int | None:
        """Write the ring's buckets in order from ``seq``; where to go on alone if detached."""
        ring = self.ring
        can_detach = self.pread is not None and (self.spill is None or lane.rejoin is None)
        next_offset: int | None = None
        progressed = self._written(lane)

        def leaving() -> bool:
            return lane.stopped or (can_detach and lane.detach)

        while True:
            with ring.cond:
                lane.waiting = True
                ring.starving.add(lane.id)
                if can_detach and seq >= ring.head and not ring.eof:
                    ring.cond.notify_all()  # the reader may let a laggard go now
                while not leaving() and seq >= ring.head and not ring.eof:
                    ring.cond.wait(POLL)
                ring.starving.discard(lane.id)
                lane.waiting = False
                lane.touch()
                if lane.stopped:
                    return None
                if can_detach and lane.detach:
                    # Bucket ``seq`` may already hold later data: never read it.
                    return self.reader.held_length if next_offset is None else next_offset
                if seq >= ring.head:
                    return None  # end of source
                view, offset = ring.bucket(seq)
            length = len(view)
            done = self._put(lane, view, offset, progressed, leaving)
            partial = done < length and can_detach and lane.detach and not lane.stopped
            if partial and self.config.record:
                self.alone[lane.id].begin(offset, view[:done])  # the rest is read alone
            del view  # a detached laggard's bucket is freed here, not kept while it goes solo
            if lane.stopped:
                return None
            if partial:
                return offset + done
            next_offset = offset + done
            seq += 1
            with ring.cond:
                if lane.id in ring.positions:
                    ring.positions[lane.id] = seq
                ring.cond.notify_all()

    def _put(self, lane: Lane, view: memoryview, offset: int, progressed: Callable[[int], None],
             leaving: Callable[[], bool]) -> int:
        """Write ``view`` at ``offset``, or skip the parts the destination holds already."""
        if not self.config.skip_identical:
            seek(lane.dest, offset)
            return write_all(lane.dest, view, offset=offset, stop=leaving, progress=progressed,
                             retries=self.config.retries, pacer=lane.pacer)
        scratch = memoryview(aligned_buffer(min(CHUNK, len(view)) or 1))
        done = 0
        while done < len(view) and not leaving():
            piece = view[done : done + min(len(scratch), max(lane.pacer.size(), 64 << 10))]
            if holds(lane.dest, offset + done, piece, scratch):
                lane.skipped += len(piece)
                lane.advance(len(piece))
                lane.post(Msg.Skipped(lane.id, lane.skipped))
                done += len(piece)
                continue
            done += write_at(lane.dest, offset + done, piece, stop=leaving, progress=progressed,
                             retries=self.config.retries, pacer=lane.pacer)
        return done

    def _solo(self, lane: Lane, offset: int) -> int | None:
        """Go on alone: positional reads of the source (or its spill) into a buffer of its own.

        Returns the bucket to rejoin the ring at, when the spill stopped before the source did.
        """
        assert self.pread is not None
        fd, base = self.pread
        buf = memoryview(aligned_buffer(CHUNK))
        progressed = self._written(lane)
        alone = self.alone[lane.id]
        while not lane.stopped:
            total = self.ring.total
            if total is not None and offset >= total:
                alone.close(offset)
                return None
            limit = len(buf) if total is None else min(len(buf), total - offset)
            if self.spill is not None:
                if not self._wait_for(lane, functools.partial(self._spilled_past, lane, offset)):
                    return None
                if lane.rejoin is not None and offset >= self.spill.end:
                    return lane.rejoin
                limit = min(limit, self.spill.end - offset)
            want = buf[:limit]
            n = os.preadv(fd, [want], base + offset)
            if n == 0:
                # A laggard on its own can overtake the reader: the end is known only once the
                # reader reaches it.
                end = self._source_end(lane) if total is None else total
                if end is None or end == offset:
                    alone.close(offset)
                    return None
                raise SourceChanged(end, offset)  # the file shrank under us
            if self.config.record:  # digests to check it against
                alone.feed(offset, buf[:n])
            self._put(lane, buf[:n], offset, progressed, lambda: lane.stopped)
            offset += n
        return None

    def _spilled_past(self, lane: Lane, offset: int) -> bool:
        """The spill holds bytes at ``offset``, or it never will (stopped, or the source ended)."""
        spill = self.spill
        assert spill is not None
        return spill.end > offset or lane.rejoin is not None or self.ring.eof

    def _source_end(self, lane: Lane) -> int | None:
        """Wait for the reader to reach the source's end; None if the run stops first."""
        return self.ring.total if self._wait_for(lane, lambda: self.ring.eof) else None

    def _wait_for(self, lane: Lane, ready: Callable[[], bool]) -> bool:
        """Wait (not a stall: the reader is behind) until ``ready()``; False if stopped."""
        ring = self.ring
        with ring.cond:
            lane.waiting = True
            while not ready() and not lane.stopped:
                ring.cond.wait(POLL)
            lane.waiting = False
            lane.touch()
        return not lane.stopped

    # ------------------------------------------------------------------------------------------
    # Finishing: verification, then the head, last.

    def _finish(self, lane: Lane) -> None:
        config = self.config
        head = self.reader.held_length
        held = self.held[:head] if self.held is not None else None
        stamped = held is not None and head > 0  # since the start (see _stamp_head)
        if config.verify and (lane.stopped or not self._verify(lane, stamp_head=stamped)):
            return
        if not self._wait_for(lane, lambda: self.ring.vouched):
            return
        if config.before_head is not None and not lane.stopped:
            lane.touch()
            config.before_head(lane.dest)  # raises: the destination fails, head unwritten
            lane.touch()
        if held is not None and head:
            lane.post(Msg.Stage(lane.id, Step.SYNCING))
            write_at(lane.dest, 0, held, stop=lambda: lane.stopped, retries=config.retries,
                     pacer=lane.pacer)
            sync(lane.dest)
            if not lane.stopped:  # the image's bytes of it (a block map's holes are not)
                self._written(lane)(self.reader.head_bytes)
            if lane.stopped:
                return
            if config.verify and not self._verify(lane, only_head=True):
                return
        if not lane.stopped:
            lane.post(Msg.Completed(lane.id))

    def _verify(self, lane: Lane, *, stamp_head: bool = False, only_head: bool = False) -> bool:
        """Check the destination against the digests; repair, then check all again.

        With ``stamp_head`` the head's place must hold the stamp; with ``only_head`` only the
        head is checked.  False (and an ``Invalid`` or error posted) when it does not read back.
        """
        source = self.source_read()
        extents, digests = list(source.extents), list(source.digests)
        has_head = self.reader.held_length > 0
        if stamp_head and has_head:
            digests[0] = xxhash.xxh3_128_digest(self.stamp[: extents[0][1]])
        indices = [0] if only_head else list(range(len(extents)))
        drop_cache(lane.dest)
        lane.post(Msg.Stage(lane.id, Step.VERIFYING))
        scratch = memoryview(aligned_buffer(min(CHUNK, self.config.bucket_size)))
        read = [0]

        def progressed(n: int) -> None:
            read[0] += n
            lane.post(Msg.Verified(lane.id, read[0]))

        def check(which: Sequence[int]) -> list[int] | None:
            try:
                return check_extents(lane, extents, digests, which, scratch, progressed)
            except EndedEarly as exc:
                self._invalid(lane, exc.offset, None, ended=True)
                return None

        bad = check(indices)
        attempts = 0
        repaired: set[int] = set()
        while bad and not lane.stopped and attempts < self.config.repairs:
            if not all(self._can_repair(i, stamp_head) for i in bad):
                break
            attempts += 1
            repaired.update(bad)
            lane.post(Msg.Stage(lane.id, Step.WRITING))
            for index in bad:
                self._rewrite(lane, index, stamp_head)
            sync(lane.dest)
            drop_cache(lane.dest)
            lane.post(Msg.Stage(lane.id, Step.VERIFYING))
            bad = check(indices)  # all again: a rewrite may have changed what was checked
        if bad is None or lane.stopped:
            return False
        if bad:
            start, length = extents[bad[0]]
            exact = self._exact(lane, bad[0], stamp_head)
            self._invalid(lane, start if exact is None else exact,
                          None if exact is not None else start + length)
            return False
        if repaired:
            lane.repaired += len(repaired)
            lane.post(Msg.Repaired(lane.id, len(repaired)))
        return True

    def _invalid(self, lane: Lane, offset: int, end: int | None, *, ended: bool = False) -> None:
        lane.mismatch = offset
        lane.error = OSError(errno.EIO, "verification failed")
        with self.ring.cond:
            self.ring.leave(lane.id)
        lane.post(Msg.Invalid(lane.id, offset, end, ended))

    def _source_bytes(self, index: int, stamp_head: bool) -> memoryview | None:
        """What extent ``index`` should hold, when it can be had without a second decompression
        (the head or stamp from memory, a raw source by position), else from ``source_at``."""
        start, length = self.reader.extents[index]
        if index == 0 and self.reader.held_length:
            assert self.held is not None
            return (self.stamp if stamp_head else self.held)[:length]
        if self.pread is not None and (self.spill is None or start + length <= self.spill.end):
            fd, base = self.pread
            buf = memoryview(aligned_buffer(length))[:length]
            got = os.preadv(fd, [buf], base + start)
            return buf[:got]
        if self.config.source_at is not None:
            return memoryview(self.config.source_at(start, length))
        return None

    def _can_repair(self, index: int, stamp_head: bool) -> bool:
        return (index == 0 and self.reader.held_length > 0) or self.pread is not None \
            or self.config.source_at is not None

    def _rewrite(self, lane: Lane, index: int, stamp_head: bool) -> None:
        data = self._source_bytes(index, stamp_head)
        if data is None:
            return
        start, length = self.reader.extents[index]
        aligned = memoryview(aligned_buffer(length))[:length]
        aligned[: len(data)] = data
        # Not counted in ``done`` (bytes of the image written): those were counted once already,
        # and a drive that fails while repaired must not look as if it got more than the image.
        write_at(lane.dest, start, aligned[: len(data)], stop=lambda: lane.stopped,
                 retries=self.config.retries, pacer=lane.pacer)

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
