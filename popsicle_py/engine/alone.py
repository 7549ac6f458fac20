"""A lane on its own (a laggard): its reads of the source by position, paced and timed as the
image's, and the digests of what it read, checked against the reader's before its head."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import xxhash

from popsicle_py.engine.lane import Lane


def read_alone(lane: Lane, fd: int, view: memoryview, at: int) -> int:
    """Fill ``view`` from the source at ``at`` (short only at its end) for a lane on its own:
    paced, and timed on the lane's source clock, so that an image that crawls or hangs is said
    to be the image's fault, not the drive's (the lane waits meanwhile, as for the reader)."""
    done = 0
    lane.waiting = True
    began = time.monotonic()
    try:
        with lane.source_clock.busy():
            while done < len(view) and not lane.stopped:
                began = time.monotonic()
                n = os.preadv(fd, [view[done : done + lane.source_pacer.size()]], at + done)
                if not n:
                    break
                lane.source_pacer.record(n, time.monotonic() - began)
                lane.source_clock.advance(n)
                done += n
    finally:
        lane.waiting = False
        lane.starved += time.monotonic() - began
        lane.touch()
    return done


class ReadAlone:
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
