"""Which blocks of a drive its file systems leave free, so a block map can leave them out.

Free blocks often hold old data (deleted files), which a map of "blocks that are not zero"
would copy for nothing.  The drive's partition table and its ext2/3/4 block bitmaps and FAT
tables are read with the parsers trim uses (:mod:`popsicle_py.usage`), through the descriptor
the drive was opened with (also one udisks handed out).  Only a clean file system whose
metadata is consistent is trusted (no journal to replay: its bitmaps could be behind); anything
else keeps every block that is not zero: a block wrongly left out would be a copy that is not
one.
"""

from __future__ import annotations

from collections.abc import Sequence

from popsicle_py.blockdev import FileLike, read_at, seek
from popsicle_py.usage import image_usage
from popsicle_py.usage.ranges import Range

#: Marks of a map's mask: a free block (left out of the map), a block always mapped.
FREE, KEEP = 1, 2
#: The drive's first and last MiB are always mapped, zeros included: a partition table's
#: zeros count (a GPT's entry arrays, the backup one at the drive's end, are checksummed
#: whole), and a map's holes keep what the drive it is copied to held there.
EDGE = 1 << 20


def free_mask(free: Sequence[tuple[int, int]], size: int, block: int) -> bytearray:
    """One byte per map block of the drive: :data:`FREE` where the whole block lies in a
    free range, else 0."""
    mask = bytearray(-(-size // block))
    for offset, length in free:
        first = -(-offset // block)
        last = (offset + length) // block  # exclusive
        if last > first:
            mask[first:last] = bytes([FREE]) * (last - first)
    return mask


def keep_edges(mask: bytearray, block: int) -> bytearray:
    """``mask`` with its first and last :data:`EDGE` bytes marked :data:`KEEP`."""
    edge = min(len(mask), -(-EDGE // block))
    mask[:edge] = bytes([KEEP]) * edge
    mask[len(mask) - edge:] = bytes([KEEP]) * edge
    return mask


def free_ranges(device: FileLike, size: int) -> tuple[list[Range], list[str], list[str]]:
    """Free byte ranges of the drive's ext2/3/4 and FAT file systems, a line for each one
    read, and one for each kept whole and why (for notes), read through ``device`` before the
    drive itself is read (and put back at its start).  :func:`popsicle_py.usage.image_usage`
    decides, as for trim: a file system not understood or not consistent keeps all its
    blocks."""
    def read(offset: int, length: int) -> bytes:
        buffer = bytearray(max(0, min(length, size - offset)))
        got = read_at(device, offset, memoryview(buffer)) if buffer else 0
        return bytes(buffer[:got])

    try:
        usage = image_usage(read, size)
    finally:
        seek(device, 0)
    free: list[Range] = []
    position = 0
    for offset, length in usage.ranges:
        if offset > position:
            free.append((position, offset - position))
        position = offset + length
    if position < size:
        free.append((position, size - position))
    kept = [f"{_on_a_drive(note).removesuffix(': written whole')}: every block kept"
            for note in usage.notes]
    return free, list(usage.found), kept


def _on_a_drive(note: str) -> str:
    """A note of :mod:`popsicle_py.usage` (which reads images) as said of a drive."""
    return f"the drive{note.removeprefix('the image')}" if note.startswith("the image:") else note
