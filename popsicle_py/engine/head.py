"""How long the image's head is: the bytes held back, stamped first and written last.

A pure decision over the image's first bytes.  The head must hold every signature by which a
computer takes a drive for the image: the partition table (MBR, GPT header and entries), ISO
9660 descriptors (32 KiB on), UDF anchors (at sector 256: 128 KiB with 512-byte sectors,
512 KiB with 2 KiB ones) and the superblocks of file systems made on the whole disk (btrfs and
ReiserFS at 64 KiB, ext2/3/4 at 1 KiB, XFS, FAT, NTFS and exFAT at 0).  So it is
:data:`HEAD` (1 MiB), or, for an image with a partition table, the bytes before its first
partition when that is less (a partition's own file system is found only through the table),
never less than :data:`MIN_HEAD`.
"""

from __future__ import annotations

import struct

#: The most held: UDF's last anchor at 512 KiB and btrfs's superblock at 64 KiB lie inside.
HEAD = 1 << 20
#: The least held, whatever the partition table says (MBR, GPT, ISO 9660 descriptors).
MIN_HEAD = 64 << 10

_MBR_SIGNATURE = b"\x55\xaa"
_GPT_SIGNATURE = b"EFI PART"
_PROTECTIVE = 0xEE


def head_length(first: bytes | bytearray | memoryview) -> int:
    """The head's length for an image that begins with ``first`` (as much of it as was read).

    Partitions that start at 0 (an isohybrid's, which holds the table itself) do not count;
    when the table cannot be read whole from ``first``, the head is :data:`HEAD`.
    """
    start = first_partition(bytes(first[: 64 << 10]))
    if start is None:
        return HEAD
    return max(MIN_HEAD, min(HEAD, start))


def first_partition(data: bytes) -> int | None:
    """Where the image's first partition (past byte 0) begins, in bytes; None if unknown."""
    if len(data) < 512 or data[510:512] != _MBR_SIGNATURE:
        return None
    entries = [struct.unpack_from("<4xB3xII", data, 446 + 16 * i) for i in range(4)]
    if any(kind == _PROTECTIVE for kind, _, _ in entries):
        return _gpt_first(data)
    starts = [lba * 512 for kind, lba, count in entries if kind and count and lba]
    return min(starts) if starts else None


def _gpt_first(data: bytes) -> int | None:
    for sector in (512, 4096):
        if data[sector : sector + 8] != _GPT_SIGNATURE or len(data) < sector + 92:
            continue
        table, count, size = struct.unpack_from("<QII", data, sector + 72)
        begin = table * sector
        if size < 128 or count > 1024 or len(data) < begin + count * size:
            return None  # the entries are not all in what was read
        starts = []
        for i in range(count):
            entry = data[begin + i * size : begin + (i + 1) * size]
            (lba,) = struct.unpack_from("<Q", entry, 32)
            if any(entry[:16]) and lba:
                starts.append(lba * sector)
        return min(starts) if starts else None
    return None
