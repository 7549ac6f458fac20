"""What an image's file systems use: the byte ranges a flash must write, the rest skipped.

:func:`image_usage` reads the partition table (MBR with logical partitions, GPT) and, in each
partition, an ext2/3/4 or FAT file system's own allocation.  Everything else is kept whole:
bytes outside every partition (tables, boot loader gaps, a backup GPT), partitions holding
anything else, and any file system whose metadata is not understood or contradicts itself
(each with a note): never a guess.  Pure: it reads the image only through ``read_at``.
"""

from __future__ import annotations

import struct

from popsicle_py.records import record
from popsicle_py.usage import ext, fat
from popsicle_py.usage.partitions import Partition, read_table
from popsicle_py.usage.ranges import (
    ALIGN,
    Inconsistent,
    Range,
    ReadAt,
    Unsupported,
    covered,
    normalize,
)

#: Where an ISO 9660 volume descriptor's "CD001" lies (a hybrid image: an ISO with a table).
_ISO9660 = 32769

__all__ = ["ALIGN", "ISO_NOTE", "Usage", "has_table_or_fs", "image_usage", "is_iso9660",
           "partitions", "worth_it"]


@record
class Usage:
    """The ranges to write (sorted, 4 KiB aligned), and what was found on the way."""

    size: int
    ranges: tuple[Range, ...]
    #: One line per file system read ("partition 2: ext4, 4 KiB blocks, ... bytes free").
    found: tuple[str, ...] = ()
    #: One line per part written whole for a reason a person may want to know.
    notes: tuple[str, ...] = ()

    @property
    def used(self) -> int:
        return covered(self.ranges)

    @property
    def skipped(self) -> int:
        return self.size - self.used


def _whole(size: int, notes: tuple[str, ...] = ()) -> Usage:
    return Usage(size, ((0, size),) if size else (), (), notes)


def _filesystem(read_at: ReadAt, part: Partition) -> tuple[list[Range], str]:
    if ext.is_ext(read_at, part.offset):
        ranges, what = ext.used_ranges(read_at, part.offset, part.length)
    elif fat.is_fat(read_at, part.offset):
        ranges, what = fat.used_ranges(read_at, part.offset, part.length)
    else:
        raise Unsupported("no ext2/3/4 or FAT file system")
    for offset, length in ranges:
        if length < 0 or offset < part.offset or offset + length > part.end:
            raise Inconsistent("its allocation points outside its partition")
    return ranges, what


ISO_NOTE = ("an ISO 9660 image: its files may lie anywhere, also in the free space of a "
            "partition inside it: written whole")


def is_iso9660(read_at: ReadAt) -> bool:
    """An ISO 9660 volume descriptor at 32 KiB (a hybrid image's, when it has a table)."""
    return read_at(_ISO9660, 5) == b"CD001"


def partitions(read_at: ReadAt, size: int) -> list[Partition] | Usage:
    """The parts whose file systems are read (the image itself when it has no table), or the
    whole image's usage when there is nothing to read (an ISO 9660 image, no table, a table
    that is not consistent)."""
    if is_iso9660(read_at):
        return _whole(size, (ISO_NOTE,))
    bare = [Partition(0, size, "the image")]
    if fat.is_fat(read_at, 0):  # a volume without a table (its boot sector ends in 55 AA)
        return bare
    try:
        parts = list(read_table(read_at, size).partitions)
    except (Inconsistent, struct.error, ValueError, IndexError, OverflowError) as exc:
        return _whole(size, (f"the partition table is not consistent ({exc}): "
                             "written whole",))
    if not parts:
        return bare if ext.is_ext(read_at, 0) else _whole(size)
    return parts


def image_usage(read_at: ReadAt, size: int) -> Usage:
    """The ranges of an image of ``size`` bytes that hold anything its file systems use."""
    parts = partitions(read_at, size)
    if isinstance(parts, Usage):
        return parts
    ranges: list[Range] = []
    found: list[str] = []
    notes: list[str] = []
    position = 0
    for part in parts:
        ranges.append((position, part.offset - position))  # between partitions: whole
        position = part.end
        try:
            used, what = _filesystem(read_at, part)
        except (struct.error, ValueError, IndexError, OverflowError) as exc:  # nonsense fields
            ranges.append((part.offset, part.length))
            notes.append(f"{part.name}: its metadata makes no sense ({exc}): written whole")
            continue
        except (Unsupported, Inconsistent) as exc:
            ranges.append((part.offset, part.length))
            notes.append(f"{part.name}: {exc}: written whole")
            continue
        ranges.extend(used)
        found.append(f"{part.name}: {what}")
    ranges.append((position, size - position))
    return Usage(size, normalize(ranges, size), tuple(found), tuple(notes))


def worth_it(usage: Usage) -> bool:
    """Skipping pays: at least 1/20 of the image (a flash with ranges keeps its drives in
    lock-step, so a few skipped megabytes are not worth the slowest drive's pace)."""
    return usage.skipped * 20 >= usage.size and usage.skipped > 0


def has_table_or_fs(head: bytes, size: int | None) -> bool:
    """The image's first bytes hold a partition table, or an ext or FAT file system."""
    def read_at(offset: int, length: int) -> bytes:
        return head[offset : offset + length]

    if fat.is_fat(read_at, 0) or ext.is_ext(read_at, 0):
        return True
    try:
        return bool(read_table(read_at, size or 1 << 62).partitions)
    except Inconsistent:
        return False
