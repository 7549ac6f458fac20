"""BusVerifier: read every destination back and compare it with the source, or with digests.

With :meth:`BusVerifier.with_digests` the source is not read again: each destination is hashed
extent by extent and checked against the writer's digests, so a compressed or streamed source is
read once in all.  Destinations should be opened so that reads reach the device (O_DIRECT, or
after dropping their cached pages): the engine reads whatever they return.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import xxhash

from popsicle_py.blockdev import FileLike, first_difference, read_full, seek
from popsicle_py.buffers import aligned_buffer
from popsicle_py.engine.builder import Builder
from popsicle_py.engine.checks import reading_back
from popsicle_py.engine.config import CHUNK, DEFAULT_BUCKET_SIZE
from popsicle_py.engine.finish import Check
from popsicle_py.engine.lane import Lane
from popsicle_py.engine.reader import Reader
from popsicle_py.engine.ring import Ring
from popsicle_py.engine.supervisor import Callback, CancelCheck, Supervisor
from popsicle_py.events import Step
from popsicle_py.messages import BusVerifierMessage as Msg

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer


class BusVerifier(Builder):
    """Compare destinations with ``source`` (read once for all), or with recorded digests."""

    def __init__(self, source: FileLike | None, destinations: Sequence[FileLike],
                 callback: Callback, cancel: CancelCheck) -> None:
        super().__init__(source, destinations, callback, cancel)
        self._digests: tuple[bytes, ...] | None = None
        self._extents: tuple[tuple[int, int], ...] = ()
        self._indices: Sequence[int] = ()
        self._report_all = False
        self._run: _VerifyRun | None = None

    def reading(self) -> bool:
        """The reader is still inside a read of the source (given up on after a stall or a
        cancel): as for :meth:`.BusWriter.reading`, the source is then left to it."""
        return self._run is not None and self._run.reader is not None \
            and self._run.reader.reading

    def expect_size(self, size: int | None, still: Callable[[], None] | None = None
                    ) -> BusVerifier:
        """Fail the run if the source does not hold exactly ``size`` bytes, or if ``still()``
        raises once it is read (it changed meanwhile): no destination matches it before."""
        return self._set(expected_size=size, vouch=still)

    def with_bucket(self, buffer: WriteableBuffer) -> BusVerifier:
        """The buffer's length sets the bucket size (the verifier keeps its own memory)."""
        size = len(memoryview(buffer).cast("B"))
        if size <= 0:
            raise ValueError("the bucket buffer is empty")
        return self._set(bucket_size=size, bucket=None)

    def with_digests(self, digests: Sequence[bytes], bucket_size: int, size: int,
                     *, first: int = 0, last: int | None = None,
                     extents: Sequence[tuple[int, int]] = (),
                     only: Sequence[int] | None = None,
                     report_all: bool = False) -> BusVerifier:
        """Check buckets ``first``..``last`` (exclusive), or the ``only`` ones, by digest.

        ``extents`` gives each digest's (offset, length) when buckets are not simply
        consecutive; by default bucket ``i`` starts at ``i * bucket_size``.  With
        ``report_all`` every bad bucket gets an ``Invalid`` message instead of only the first.
        """
        self._digests = tuple(digests)
        self._extents = tuple(extents) or tuple(
            (i * bucket_size, min(bucket_size, size - i * bucket_size))
            for i in range(len(self._digests)))
        end = len(self._digests) if last is None else min(last, len(self._digests))
        self._indices = list(only) if only is not None else range(first, end)
        self._report_all = report_all
        return self._set(bucket_size=bucket_size, bucket=None)

    def verify(self) -> list[bool]:
        """Run to the end; returns, per destination, whether it matched.

        Raises :class:`~popsicle_py.errors.Cancelled` when cancelled and the source's error
        when reading it fails.
        """
        run = _VerifyRun(self)
        self._run = run
        self._attach(run.supervisor.outbox)
        return run.run()


class _VerifyRun:
    """One run of a BusVerifier: all of its state, declared here."""

    def __init__(self, verifier: BusVerifier) -> None:
        self.verifier = verifier
        self.config = verifier.config
        self.ring = Ring(self.config.buckets, self.config.bucket_size or DEFAULT_BUCKET_SIZE)
        self.supervisor = Supervisor(verifier.destinations, verifier.callback, verifier.cancel,
                                     stall_timeout=self.config.stall_timeout,
                                     errored=Msg.Errored, name="verifier",
                                     wake=self.ring.wake, leave=self.ring.leave)
        self.lanes = self.supervisor.lanes
        self.verdicts = [False] * len(self.lanes)
        self.reader: Reader | None = None  # when compared with a source

    def run(self) -> list[bool]:
        v = self.verifier
        if v._digests is not None:
            error = self.supervisor.run(self._digest_lane)
        else:
            source = v.source
            if source is None:
                raise ValueError("no source: give one to BusVerifier() or from_source(), or "
                                 "digests to with_digests()")
            if hasattr(source, "seek") and getattr(source, "seekable", lambda: True)():
                source.seek(0)
            self.ring.join(lane.id for lane in self.lanes)
            reader = Reader(source, self.ring, self.lanes, self.config, self.supervisor.stop,
                            None)
            import hashlib  # here: a flash's start-up imports this module, not hashlib

            reader.sha256 = hashlib.sha256()  # a drive that matched holds bytes of this digest
            self.reader = reader
            error = self.supervisor.run(self._compare_lane, reader.run, reader.clock)
        if error is not None:
            raise error
        return list(self.verdicts)

    def _progress(self, lane: Lane, n: int) -> None:
        lane.done += n
        lane.post(Msg.Read(lane.id, lane.done))

    def _end(self, lane: Lane, valid: bool, offset: int = 0, end: int | None = None) -> None:
        self.verdicts[lane.id] = valid
        self.ring.leave(lane.id)
        reader = self.reader  # at the ring's end, the reader has hashed every byte it read
        digest = reader.sha256.hexdigest() if valid and reader is not None \
            and reader.sha256 is not None and self.ring.eof else None
        lane.post(Msg.Valid(lane.id, digest, lane.spent(Step.VERIFYING)) if valid
                  else Msg.Invalid(lane.id, offset, end))

    def _compare_lane(self, lane: Lane) -> None:
        lane.enter(Step.VERIFYING)
        ring = self.ring
        seek(lane.dest, 0)
        mine = memoryview(aligned_buffer(CHUNK))
        seq = 0
        while True:
            bucket = ring.next_bucket(lane, seq, lambda: lane.stopped)
            if lane.stopped:
                return
            if bucket is None:
                break
            theirs, offset = bucket
            del bucket
            start = 0
            while start < len(theirs):
                if lane.stopped:
                    return
                want = theirs[start : start + lane.pacer.size()]
                with reading_back(offset + start, len(want)):
                    got = read_full(lane.dest, mine[: len(want)], pacer=lane.pacer)
                a, b = mine[:got], want[:got]
                if xxhash.xxh3_128_digest(a) != xxhash.xxh3_128_digest(b):
                    return self._end(lane, False, offset + start + first_difference(a, b))
                if got:  # a Read that adds nothing would repeat the last count
                    lane.advance(got)
                    self._progress(lane, got)
                if got < len(want):
                    return self._end(lane, False, offset + start + got)
                start += got
            del theirs
            ring.moved_past(lane.id, seq)
            seq += 1
        # The source's end checked first: a file cut short or changed mid-read matched "ok".
        if ring.wait_until(lane, lambda: ring.vouched):
            self._end(lane, True)

    def _digest_lane(self, lane: Lane) -> None:
        v = self.verifier
        assert v._digests is not None
        lane.enter(Step.VERIFYING)
        lane.waiting = False
        check = Check(v._extents, v._digests, self.config.bucket_size)
        verdict = check.run(lane, v._indices, lambda n: self._progress(lane, n),
                            all_bad=v._report_all)
        if verdict.ended is not None:
            return self._end(lane, False, verdict.ended)
        if lane.stopped:
            return
        bad = verdict.bad
        if not bad:
            return self._end(lane, True)
        for index in bad[:-1]:
            start, length = v._extents[index]
            lane.post(Msg.Invalid(lane.id, start, start + length))
        start, length = v._extents[bad[-1]]
        self._end(lane, False, start, start + length)
