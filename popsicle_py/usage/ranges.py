"""Byte ranges of an image: merged, aligned, and what a reader of the image looks like.

The parsers of this package read the image only through a :data:`ReadAt` (``read_at(offset,
length)``), so that they are plain functions over bytes, testable on files and buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

#: Returns up to ``length`` bytes of the image at ``offset`` (fewer only at its end).
ReadAt = Callable[[int, int], bytes]
#: (offset, length) of bytes of the image to write.
Range = tuple[int, int]

#: Ranges are widened to this: a drive's logical block (4Kn) and O_DIRECT's alignment.
ALIGN = 4096
#: Two used ranges closer than this are written as one: a short write of free space costs less
#: than another call, another bucket and another extent to verify.
MERGE_GAP = 1 << 20


class Inconsistent(Exception):
    """The metadata contradicts itself: the whole partition is written (``str()`` says why)."""


class Unsupported(Exception):
    """A file system (or a feature of one) not understood: written whole (``str()`` says why)."""


def normalize(ranges: Iterable[Range], size: int, align: int = ALIGN,
              gap: int = MERGE_GAP) -> tuple[Range, ...]:
    """Sorted, widened to ``align``, clipped to ``size``, and merged across gaps under ``gap``."""
    out: list[list[int]] = []
    for offset, length in sorted(r for r in ranges if r[1] > 0):
        start = offset - offset % align
        end = min(size, -(-(offset + length) // align) * align)
        if end <= start:
            continue
        if out and start <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return tuple((start, end - start) for start, end in out)


def covered(ranges: Iterable[Range]) -> int:
    """How many bytes the (non-overlapping) ranges hold."""
    return sum(length for _, length in ranges)


def read_exact(read_at: ReadAt, offset: int, length: int, what: str) -> bytes:
    """``length`` bytes at ``offset``, or :class:`Inconsistent` when the image ends first."""
    data = read_at(offset, length)
    if len(data) != length:
        raise Inconsistent(f"{what} lies past the image's end")
    return data


def bit_runs(bitmap: bytes, count: int) -> Iterable[Range]:
    """(first, count) of each run of set bits among the first ``count`` (little-endian bits)."""
    value = int.from_bytes(bitmap, "little")
    value &= (1 << count) - 1
    pos = 0
    while value:
        low = (value & -value).bit_length() - 1  # next set bit
        value >>= low
        pos += low
        inverted = ~value & (value + 1)  # lowest clear bit of value
        run = inverted.bit_length() - 1
        yield pos, run
        value >>= run
        pos += run
