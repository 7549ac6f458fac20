"""Reading a destination back and checking it against recorded digests: one routine for the
writer's own verification and for :class:`~popsicle_py.engine.verifier.BusVerifier`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import xxhash

from popsicle_py.blockdev import read_at
from popsicle_py.engine.supervisor import Lane


class EndedEarly(Exception):
    """The destination ended at ``offset``, before the extent did."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


#: Sees every piece read back: the extent's index and the bytes (valid during the call only).
Tap = Callable[[int, memoryview], None]


@contextlib.contextmanager
def reading_back(start: int, length: int) -> Iterator[None]:
    """An OSError of a read of ``length`` bytes at ``start`` names them: the user can map a
    failing drive's bad place to a file on it."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror or exc} (reading back bytes {start}-"
                      f"{start + length - 1})") from exc


def check_extents(lane: Lane, extents: Sequence[tuple[int, int]], digests: Sequence[bytes],
                  indices: Sequence[int], scratch: memoryview,
                  progressed: Callable[[int], None], *, all_bad: bool = True,
                  tap: Tap | None = None) -> list[int]:
    """The indices of the extents whose bytes on the destination fail their digest.

    Reads in calls sized by the lane's pacer; ``progressed(n)`` follows each, and ``tap``
    sees the bytes (the device's SHA-256, with no second read).  Stops at the first bad one
    unless ``all_bad``.  Returns early (with what it found) once the lane is stopped; raises
    :class:`EndedEarly` when the destination is shorter than an extent.
    """
    bad: list[int] = []
    for index in indices:
        start, length = extents[index]
        hasher = xxhash.xxh3_128()
        done = 0
        while done < length:
            if lane.stopped:
                return bad
            want = scratch[: min(len(scratch), length - done, lane.pacer.size())]
            with reading_back(start + done, len(want)):
                got = read_at(lane.dest, start + done, want, pacer=lane.pacer)
            if got == 0:
                raise EndedEarly(start + done)
            hasher.update(want[:got])
            if tap is not None:
                tap(index, want[:got])
            done += got
            lane.advance(got)
            progressed(got)
        if hasher.digest() != digests[index]:
            bad.append(index)
            if not all_bad:
                return bad
    return bad
