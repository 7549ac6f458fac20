"""Where an erase puts its one partition, and what it makes there (pure decisions).

Everything counts in the drive's own logical sector (512 bytes, or 4096 on a "4Kn" drive):
an MBR's addresses are in those sectors, and a FAT or exFAT volume's sector must be the
drive's (Linux and Windows refuse to mount one whose sector is smaller: "logical sector size
too small for device").  A table written in 512-byte units on a 4096-byte drive points 8
times too far, at bytes that are not the file system.
"""

from __future__ import annotations

import struct

from popsicle_py.records import record

MiB = 1 << 20
GiB = 1 << 30
#: The partition starts at 1 MiB (what every partitioning tool does: erase blocks align).
PART_START = MiB
#: Up to this size a drive gets FAT32 by default, above it exFAT (as Windows formats them).
FAT32_DEFAULT_LIMIT = 32 * GiB
#: The smallest partition holding FAT32's 65525 clusters of 512 bytes, with its two FATs
#: and reserved sectors (mkfs.vfat makes 66512 clusters in 33 MiB): below, FAT16 or FAT12.
#: With 4096-byte sectors a cluster is at least 4096 bytes: 8 times as much
#: (:func:`fat32_min_length`).
FAT32_MIN_LENGTH = 33 * MiB
#: Below this (per 512 bytes of sector), FAT12 rather than FAT16.
FAT16_MIN_LENGTH = 16 * MiB
#: The smallest partition mkfs.exfat (exfatprogs 1.2) makes: more than twice its 1 MiB
#: boundary alignment (a 2 MiB one fails, "boundary alignment is too big"), so 2 MiB and a
#: 4 KiB block, found by trying sizes.
EXFAT_MIN_LENGTH = 2 * MiB + 4096
#: An MBR counts sectors in 32 bits: 2 TiB of 512-byte sectors at most (16 TiB of 4096).
MBR_MAX_SECTORS = 2**32 - 1


def default_fs(size: int, sector: int = 512) -> str:
    """FAT32 up to 32 GiB, exFAT above (what Windows, macOS and Linux all read); FAT32 at
    any size on a drive whose sectors are not 512 bytes: mkfs.exfat, which makes the file
    system in a file, makes 512-byte sectors only."""
    return "fat32" if size <= FAT32_DEFAULT_LIMIT or sector != 512 else "exfat"


@record
class Layout:
    """The one partition: where it starts, how long it is, its MBR type, its FAT size, and
    the drive's logical sector (the unit of the table and of the file system)."""

    start: int
    length: int
    type_byte: int
    fat_bits: int = 0  # 12, 16 or 32 for FAT; 0 for exFAT
    sector: int = 512


def _length(size: int, sector: int = 512) -> int:
    """The partition's length on a drive of ``size`` bytes (0: none fits)."""
    length = min(size - PART_START, MBR_MAX_SECTORS * sector)
    block = max(4096, sector)
    return max(0, length - length % block)


def fat32_min_length(sector: int = 512) -> int:
    """The smallest partition that holds a real FAT32 with ``sector``-byte sectors."""
    return FAT32_MIN_LENGTH * max(1, sector // 512)


def fat32_fits(size: int, sector: int = 512) -> bool:
    """Whether a drive of ``size`` bytes can hold a real FAT32: at least 65525 clusters (the
    count every system, Windows included, tells FAT32 by; mkfs.vfat takes one-sector clusters
    up to 260 MiB, as Windows does), so a partition of at least :func:`fat32_min_length`."""
    return _length(size, sector) >= fat32_min_length(sector)


def no_fat32(path: str, size: int, sector: int = 512) -> str | None:
    """Why ``--fs fat32`` cannot be made on the drive ``path`` (one line), or None (also for
    a drive too small to partition at all: that has its own line)."""
    length = _length(size, sector)
    if fat32_fits(size, sector) or length < MiB:
        return None
    scale = max(1, sector // 512)
    sectors = "" if sector == 512 else f" with its {sector}-byte sectors"
    return (f"{path} is too small for FAT32{sectors} (a partition of at least "
            f"{fat32_min_length(sector) // MiB} MiB after the first MiB): leave out --fs to "
            f"make {'FAT16' if length >= FAT16_MIN_LENGTH * scale else 'FAT12'}")


def no_exfat(path: str, size: int, sector: int = 512) -> str | None:
    """Why ``--fs exfat`` cannot be made on the drive ``path`` (one line), or None (also for
    a drive too small to partition at all: that has its own line)."""
    length = _length(size, sector)
    if sector != 512 and length >= MiB:
        return (f"{path} has {sector}-byte sectors, and mkfs.exfat makes exFAT with 512-byte "
                "ones only (in the file it is made in): leave out --fs to make "
                f"FAT{layout(size, 'fat32', sector).fat_bits}")
    if length >= EXFAT_MIN_LENGTH or length < MiB:
        return None
    return (f"{path} is too small for exFAT (mkfs.exfat needs a partition of more than "
            f"{EXFAT_MIN_LENGTH // MiB} MiB after the first MiB): leave out --fs to make FAT12")


def layout(size: int, fs: str, sector: int = 512) -> Layout:
    """One partition from 1 MiB to the drive's end (or the MBR's last sector), whole 4 KiB
    blocks (whole sectors).

    "fat32" is FAT32 wherever it fits (:func:`fat32_fits`); below, FAT16 (or FAT12), under
    the MBR type that says which.  :func:`made` names what is made.
    """
    length = _length(size, sector)
    if length < MiB:
        raise ValueError(f"the drive is too small to partition ({size} bytes)")
    if fs == "exfat":
        return Layout(PART_START, length, 0x07, 0, sector)
    if length >= fat32_min_length(sector):
        return Layout(PART_START, length, 0x0C, 32, sector)
    if length >= FAT16_MIN_LENGTH * max(1, sector // 512):
        return Layout(PART_START, length, 0x0E, 16, sector)
    return Layout(PART_START, length, 0x01, 12, sector)


def made(size: int, fs: str, sector: int = 512) -> str:
    """What an erase leaves on a drive of ``size`` bytes, as its note says it: "one FAT32
    partition", "one FAT16 partition (too small for FAT32)", "wiped only"."""
    if fs == "none":
        return "wiped only"
    try:
        part = layout(size, fs, sector)
    except ValueError:
        return "nothing: too small to partition"
    used = "" if part.start + part.length + max(4096, sector) > size else (
        f" over its first {_tib(part.start + part.length)} (the most an MBR addresses)")
    if fs == "exfat":
        return f"one exFAT partition{used}"
    name = f"one FAT{part.fat_bits} partition{used}"
    return name if part.fat_bits == 32 else f"{name} (too small for FAT32)"


def _tib(size: int) -> str:
    return f"{size / (1 << 40):.2f} TiB".replace(".00 ", " ")


def mbr(part: Layout, signature: bytes) -> bytes:
    """A DOS partition table with the one partition (LBA addressing in the drive's sectors,
    CHS fields "past 8 GiB"): the table's sector 0, 512 bytes."""
    sector = bytearray(512)
    sector[440:444] = signature[:4]
    entry = struct.pack("<B3sB3sII", 0x00, b"\xfe\xff\xff", part.type_byte, b"\xfe\xff\xff",
                        part.start // part.sector, part.length // part.sector)
    sector[446:462] = entry
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)
