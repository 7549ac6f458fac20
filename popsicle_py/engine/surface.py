"""The surface test (``--surface-test``): the drive past the image written, read back, cleared.

As f3write/f3read do, every 64 KiB block of the rest of the drive gets a pattern that names
its own offset (and this run), so a block that reads back wrong, or as another block (a drive
that wraps addresses), is found; the first bad region rejects the drive (cause ``surface``),
naming its offset.  Then the tested range is zeroed, so the drive carries no test pattern.
It runs after the image is verified and before the image's head is written: a drive rejected
here never holds the head.  Its writes may land on the image (a drive whose addresses past its
real size wrap onto the first ones), so the image is read back whole once more after it
(:func:`image_changed` rejects the drive when it changed), and only that pass vouches for the
drive.  It costs two writes and one read of the rest of the drive, and one more read of the
image.
"""

from __future__ import annotations

import contextlib
import os
import struct

from popsicle_py.blockdev import drop_cache, first_difference, read_at, sync, write_at
from popsicle_py.buffers import aligned_buffer
from popsicle_py.engine.lane import Lane
from popsicle_py.errors import Rejected

#: What is written and read back at a time.
PIECE = 4 << 20
#: Each block of this size starts with its offset and the run's mark.
BLOCK = 64 << 10
#: Where the test starts: the image's end rounded up to this (whole, aligned blocks).
ALIGN = 1 << 20


def tested_range(image_end: int, drive_size: int) -> tuple[int, int]:
    """(start, end) of what the surface test covers: after the image, to the drive's end."""
    start = -(-image_end // ALIGN) * ALIGN
    return min(start, drive_size), drive_size


def _pattern(buffer: memoryview, template: memoryview, offset: int, mark: bytes) -> None:
    """The template, with each block's first 16 bytes its offset and the run's mark."""
    buffer[:] = template[: len(buffer)]
    for at in range(0, len(buffer), BLOCK):
        buffer[at : at + 16] = struct.pack("<Q", offset + at) + mark


def _rejected(offset: int, why: str) -> Rejected:
    return Rejected("surface", f"surface test: bad region at byte {offset}: {why}")


def image_changed(offset: int, *, ended: bool = False) -> Rejected:
    """The image, verified before the surface test, reads back otherwise after it (or ends at
    ``offset``): the test's writes past the image landed on it."""
    if ended:
        return _rejected(offset, "the drive ends there, before the image's end, after the "
                                 "surface test")
    return _rejected(offset, "the image read back changed after the rest of the drive was "
                             "written (its addresses wrap onto the image)")


def run(lane: Lane, image_end: int, drive_size: int, retries: int) -> None:
    """Write, read back and clear the drive past ``image_end``; raise :class:`Rejected` at the
    first bad region (after clearing what was written)."""
    start, end = tested_range(image_end, drive_size)
    if start >= end:
        return
    mark = os.urandom(8)
    template = memoryview(aligned_buffer(PIECE))
    template[:] = os.urandom(PIECE)
    mine = memoryview(aligned_buffer(PIECE))
    theirs = memoryview(aligned_buffer(PIECE))
    lane.waiting = False
    lane.touch()

    def stopped() -> bool:
        return lane.stopped

    def each() -> list[tuple[int, int]]:
        return [(at, min(PIECE, end - at)) for at in range(start, end, PIECE)]

    bad: Rejected | None = None
    at = start
    try:
        for at, length in each():
            if lane.stopped:
                return
            _pattern(mine[:length], template, at, mark)
            write_at(lane.dest, at, mine[:length], stop=stopped, retries=retries,
                     pacer=lane.pacer)
            lane.advance(length)
        sync(lane.dest)
        drop_cache(lane.dest)
        for at, length in each():
            if lane.stopped:
                return
            _pattern(mine[:length], template, at, mark)
            got = read_at(lane.dest, at, theirs[:length], pacer=lane.pacer)
            lane.advance(max(got, 1))
            if got < length:
                bad = _rejected(at + got, "the drive ends there, before its size")
                break
            if theirs[:length] != mine[:length]:
                first = at + first_difference(mine[:length], theirs[:length])
                bad = _rejected(first, "it reads back other bytes than were written")
                break
    except OSError as exc:
        if lane.stopped:
            return
        bad = _rejected(at, f"{exc.strerror or exc}")
    finally:
        if not lane.stopped:
            _clear(lane, start, end, retries)
    if bad is not None:
        raise bad


def _clear(lane: Lane, start: int, end: int, retries: int) -> None:
    """Zero the tested range (errors ignored: a bad region may refuse the writes)."""
    zeros = memoryview(aligned_buffer(PIECE))
    for at in range(start, end, PIECE):
        if lane.stopped:
            return
        try:
            write_at(lane.dest, at, zeros[: min(PIECE, end - at)], stop=lambda: lane.stopped,
                     retries=retries, pacer=lane.pacer)
        except OSError:
            continue
        lane.advance(min(PIECE, end - at))
    with contextlib.suppress(OSError):
        sync(lane.dest)
