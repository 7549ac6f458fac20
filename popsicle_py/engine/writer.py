"""BusWriter: read a source once and write it to many destinations in parallel.

The builder methods only replace a frozen :class:`~popsicle_py.engine.config.Config`; ``write()``
makes a :class:`_WriteRun`, which owns everything of one run from its constructor: the ring,
the reader, the supervisor and its lanes.

With :meth:`BusWriter.finish_each`, each destination is also finished by the engine (by
:class:`~popsicle_py.engine.finish.Finisher`), on its own timeline, in this order, so that a
drive is never reported complete unless the bytes on it at the end are the image's, and never
looks like the image to a computer before that:

1. a random stamp where the image's head (its first MiB: :mod:`.head`) goes, before anything
   else: a drive stopped at any later point shows neither the image's head nor what it held
   before (an old image's partition table over new data would pass for a good disk).
   A preparation's put-back (:meth:`BusWriter.prepare_each`: the probe's saved blocks) runs
   once it is written, told how much of the drive's start it covered, or, if the lane ends
   before, with nothing covered;
2. every bucket but the head, then fsync;
3. with verification: every extent read back from the device and checked against the
   digests the reader recorded, the stamp included.
   Bad buckets are rewritten and then *every* extent is checked again (a write to a drive that
   aliases addresses, as counterfeit sticks do, can spoil what was checked before it).  The
   stamp reading back proves that the head's blocks are shared with no other checked block, so
   writing the head next cannot change anything already checked;
4. once the reader has vouched for the whole source (its checksum, computed in the same pass):
   the head, fsync, and the head read back.  A drive that fails or is stopped from the
   head's first write on gets the stamp back over it (see :class:`~.finish.Finisher`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from popsicle_py import signals
from popsicle_py.blockdev import FileLike, holds, seek, sync, write_all, write_at
from popsicle_py.buffers import aligned_buffer, is_aligned
from popsicle_py.engine.alone import ReadAlone, read_alone
from popsicle_py.engine.builder import Builder
from popsicle_py.engine.config import (
    CHUNK,
    HEAD,
    QUIT_GRACE,
    BeforeHead,
    Config,
    Extent,
    Prepare,
    PutBack,
    Selector,
    SourceAt,
)
from popsicle_py.engine.finish import Finisher
from popsicle_py.engine.lane import Lane
from popsicle_py.engine.reader import Reader, pread_source
from popsicle_py.engine.results import DestinationResult, WriteResult
from popsicle_py.engine.ring import Ring
from popsicle_py.engine.spill import Spill, default_dir
from popsicle_py.engine.supervisor import Callback, CancelCheck, Supervisor
from popsicle_py.errors import (
    AllDestinationsFailed,
    SourceChanged,
    SourceDiffers,
    SourceUnreadable,
)
from popsicle_py.events import Step
from popsicle_py.messages import BusWriterMessage as Msg

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer


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

    def __init__(self, source: FileLike | None, destinations: Sequence[FileLike],
                 callback: Callback, cancel: CancelCheck) -> None:
        super().__init__(source, destinations, callback, cancel)
        self._run: _WriteRun | None = None

    # Builder methods (the seed's API, chainable).
    def with_bucket(self, buffer: WriteableBuffer) -> BusWriter:
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
        """Keep the image's head (up to its first MiB, over as many reads) out of the writes.

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

    def select(self, selector: Selector | None) -> BusWriter:
        """Read every byte of the source but write (and verify) only the runs ``selector``
        keeps, deciding as it goes (a compressed image's free space).  Destinations stay in
        lock-step, as with :meth:`only_extents`; not with it."""
        return self._set(select=selector)

    def prepare_each(self, prepare: Prepare | None) -> BusWriter:
        """Run ``prepare(destination, answered)`` on its own thread before writing it (a
        capacity probe; ``answered()`` after each of its small requests keeps the stall clock
        from calling a slow but answering drive stalled).

        An OSError fails that destination before anything of the source is written to it.
        What it returns, if anything (a :data:`~.config.PutBack`), is called once the head's
        stamp is written, or as the lane ends before it (a probe puts back its stamps in the
        head only where the stamp did not overwrite them: saved writes when the flash goes on).
        """
        return self._set(prepare=prepare)

    def before_head_each(self, step: BeforeHead | None) -> BusWriter:
        """Run ``step(destination, progressed)`` once it is written and verified, before its
        head.  With :meth:`finish_each` only.  ``progressed(n)`` keeps the stall clock off a
        step that moves bytes; an exception fails that destination, head unwritten.
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
        return self._run is not None and self._run.reader.reading

    def surface_test(self, enabled: bool = True) -> BusWriter:
        """With :meth:`finish_each` and verification: test the rest of each drive (see
        :mod:`.surface`) before its head is written."""
        return self._set(surface=enabled)

    def give_up(self, index: int, error: OSError) -> None:
        """Stop writing destination ``index`` (from the callback's thread): it fails with
        ``error`` and is not written further; never holds the head (that comes last)."""
        if self._run is not None:
            self._run.supervisor.give_up(index, error)

    def starved(self, index: int) -> float:
        """Seconds destination ``index`` has waited for the image so far (not its time)."""
        run = self._run
        return run.lanes[index].starved if run is not None else 0.0

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
        if self.source is None:
            raise ValueError("no source: give one to BusWriter() or from_source()")
        if self.config.select is not None and self.config.extents is not None:
            raise ValueError("select() and only_extents() cannot be combined")
        if self.config.hold_head:
            for dest in self.destinations:
                if not (hasattr(dest, "seek") and (not hasattr(dest, "seekable")
                                                   or dest.seekable())):
                    raise ValueError("first_bucket_last needs seekable destinations")
        run = _WriteRun(self.source, self.destinations, self.callback, self.cancel, self.config)
        self._run = run
        self._attach(run.supervisor.outbox)
        return run.run()


def _put_back(put_back: PutBack, stamped: int, *, quietly: bool) -> None:
    """Call a preparation's put-back; ``quietly`` for a lane already failing or stopped,
    whose own error (or none, for a cancel) is what its result says."""
    if not quietly:
        put_back(stamped)
        return
    with contextlib.suppress(Exception):  # a pulled or closed drive: nothing more to do
        put_back(stamped)


def _create_spill(config: Config, cancel: CancelCheck) -> Spill | str:
    """The spill, or why there is none.  Made on a watched worker: its directory's statfs and
    mkdir on a hung disk (a hung NFS /var/tmp) would hold the calling thread, Ctrl-C unheard;
    one that does not answer within the stall timeout leaves the drives in lock-step."""
    from popsicle_py.engine.watched import WorkStalled, watched

    try:
        made = watched(lambda clock, stopped: Spill.create(config.spill_dir or None,
                                                           config.expected_size),
                       cancel=cancel, stall_timeout=config.stall_timeout, name="spill")
    except WorkStalled as exc:
        where = config.spill_dir or default_dir()
        return f"{where} did not answer for {exc.limit:g} s (is the disk it is on hung?)"
    return made if made is not None else "cancelled"


class _WriteRun:
    """One run of a BusWriter: all of its state, declared here."""

    def __init__(self, source: FileLike, destinations: Sequence[FileLike],
                 callback: Callback, cancel: CancelCheck, config: Config) -> None:
        self.config = config
        first = memoryview(config.bucket).cast("B") if config.bucket is not None else None
        self.ring = Ring(config.buckets, config.bucket_size, first)
        self.supervisor = Supervisor(destinations, callback, cancel,
                                     stall_timeout=config.stall_timeout,
                                     errored=Msg.Errored, name="writer",
                                     wake=self.ring.wake, leave=self.ring.leave)
        self.lanes = self.supervisor.lanes
        self.held = memoryview(aligned_buffer(HEAD)) if config.hold_head else None
        lock_step = (not config.laggards or config.extents is not None
                     or config.select is not None)
        self.pread = None if lock_step else pread_source(source)
        self.spill: Spill | None = None
        if self.pread is None and not lock_step and config.spill_dir is not None:
            made = _create_spill(config, cancel)
            if isinstance(made, Spill):
                self.spill = made
                self.pread = (made.fd, 0)
            else:
                self.supervisor.outbox.put(Msg.LockStep(made))
        self.reader = Reader(source, self.ring, self.lanes, config, self.supervisor.stop,
                             self.held, laggards=self.pread is not None, spill=self.spill,
                             post=self.supervisor.outbox.put)
        self.finisher = Finisher(config, self.ring, self.reader, self.held, self.pread,
                                 self.spill, self._written)
        self._spill_orphaned = False
        self._quitting = False  # a second Ctrl-C's wait for the heads (see _on_quit) began
        self._spill_lock = threading.Lock()
        self._running = len(self.lanes)  # lane threads not yet returned
        #: Each lane's reads on its own, checked before its head (only with recorded digests).
        self.alone = {lane.id: ReadAlone(config.bucket_size) for lane in self.lanes}
        self.ring.join(lane.id for lane in self.lanes)

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

    def run(self) -> WriteResult:
        signals.AT_QUIT.append(self._on_quit)
        try:
            error = self.supervisor.run(self._task, self.reader.run, self.reader.clock)
        finally:
            with contextlib.suppress(ValueError):
                signals.AT_QUIT.remove(self._on_quit)
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

    def _on_quit(self) -> None:
        """A second Ctrl-C quits at once, in its signal handler: but first, for QUIT_GRACE at
        most, the lanes that began their head (stopped by the first) put the stamp back over
        it, so that an interrupted drive does not hold part of the image's head.  A third
        signal meanwhile quits without waiting."""
        if self._quitting:
            return
        self._quitting = True
        if not any(lane.at_risk for lane in self.lanes):
            return
        signals.say_on_stderr("writing the stamp back over the heads begun first (at most "
                              f"{QUIT_GRACE:g} s)")
        deadline = time.monotonic() + QUIT_GRACE
        while any(lane.at_risk for lane in self.lanes) and time.monotonic() < deadline:
            time.sleep(0.02)

    def source_read(self) -> WriteResult:
        reader = self.reader
        held = self.held[: reader.held_length] if self.held is not None else None
        return WriteResult((), self.ring.total or 0, self.config.bucket_size,
                           tuple(reader.digests), held, tuple(reader.extents))

    # ------------------------------------------------------------------------------------------
    # One lane, on its own thread.

    def _lane(self, lane: Lane) -> None:
        config = self.config
        put_back: PutBack | None = None
        lane.enter(Step.PROBING if config.prepare is not None else Step.WRITING)
        if config.prepare is not None:
            lane.waiting = False
            lane.touch()
            put_back = config.prepare(lane.dest, lane.answered)
            lane.touch()
            lane.stage(Step.WRITING)
        if config.pipeline and self.held is not None:
            stamped = False
            try:
                stamped = self.finisher.stamp(lane)
            finally:
                if put_back is not None:  # the probe's stamps beyond the head's stamp
                    _put_back(put_back, self.reader.held_length if stamped else 0,
                              quietly=not stamped)
            if not stamped:
                return
        elif put_back is not None:
            _put_back(put_back, 0, quietly=False)
        resume = self._from_ring(lane)
        while resume is not None and not lane.stopped:
            rejoin = self._solo(lane, resume)
            if rejoin is None:
                break
            lane.detach = lane.solo = False  # the spill stopped: back to the ring
            resume = self._from_ring(lane, rejoin)
        if lane.stopped:
            return
        self.ring.leave(lane.id)
        sync(lane.dest)
        if lane.stopped or not self._check_alone(lane):
            return
        if config.pipeline:
            self.finisher.finish(lane)
        elif not lane.stopped:
            lane.post(Msg.Completed(lane.id, write_seconds=lane.spent(Step.WRITING)))

    def _check_alone(self, lane: Lane) -> bool:
        """What the lane read on its own matches what the reader read (once it read it all)."""
        alone = self.alone[lane.id]
        if not alone.buckets or not self.config.record:
            return True
        if not self.ring.wait_until(lane, lambda: self.ring.eof):
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
            bucket = ring.next_bucket(lane, seq, leaving, nudge=can_detach)
            if lane.stopped:
                return None
            if bucket is None:
                if can_detach and lane.detach:
                    # Bucket ``seq`` may already hold later data: never read it.
                    return self.reader.held_length if next_offset is None else next_offset
                return None  # end of source
            view, offset = bucket
            del bucket
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
            ring.moved_past(lane.id, seq)
            seq += 1

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
                if not self.ring.wait_until(lane, functools.partial(self._spilled_past, lane,
                                                                    offset)):
                    return None
                if lane.rejoin is not None and offset >= self.spill.end:
                    return lane.rejoin
                limit = min(limit, self.spill.end - offset)
            try:
                n = read_alone(lane, fd, buf[:limit], base + offset)
            except OSError as exc:  # the image's fault (or its spill's), not the drive's
                raise SourceUnreadable(exc, offset, "the image" if self.spill is None else
                                       f"the image's spill file in {self.spill.directory}"
                                       ) from exc
            if lane.stopped:  # its read was cut short by the stop, not by the source's end
                return None
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
        return self.ring.total if self.ring.wait_until(lane, lambda: self.ring.eof) else None
