"""Partition tables: MBR (with extended and logical partitions) and GPT, read, never trusted.

Each partition is returned with where it lies in the image; its type is not believed, the file
system in it is recognised by its own signature later.  A table that points past the image or
whose partitions overlap is :class:`Inconsistent`: the whole image is then written.
"""

from __future__ import annotations

import itertools
import struct
import zlib

from popsicle_py.records import record
from popsicle_py.usage.ranges import Inconsistent, ReadAt, read_exact

_EXTENDED = (0x05, 0x0F, 0x85)
_PROTECTIVE = 0xEE
#: Logical partitions followed before a chain of EBRs is taken for a loop.
_MAX_LOGICAL = 128


@record
class Partition:
    """``length`` bytes at ``offset`` of the image; ``name`` for notes ("partition 2")."""

    offset: int
    length: int
    name: str

    @property
    def end(self) -> int:
        return self.offset + self.length


@record
class Table:
    """The partitions found (none: no table), and which table it was."""

    kind: str  # "mbr", "gpt" or "none"
    partitions: tuple[Partition, ...]


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int]]:
    """(type, first LBA, sectors) of each non-empty entry: one with sectors, whatever its
    type (Linux and libblkid take a type 0 entry with a size for a partition too)."""
    out = []
    for i in range(4):
        entry = sector[446 + 16 * i : 462 + 16 * i]
        ptype = entry[4]
        first, count = struct.unpack_from("<II", entry, 8)
        if count:
            out.append((ptype, first, count))
    return out


def _gpt(read_at: ReadAt, size: int, sector: int) -> Table | None:
    header = read_at(sector, 92)
    if len(header) < 92 or header[:8] != b"EFI PART":
        return None
    hsize = struct.unpack_from("<I", header, 12)[0]
    if not 92 <= hsize <= sector:
        raise Inconsistent("the GPT header's size is wrong")
    header = read_exact(read_at, sector, hsize, "the GPT header")
    crc = struct.unpack_from("<I", header, 16)[0]
    if zlib.crc32(header[:16] + b"\0\0\0\0" + header[20:]) != crc:
        raise Inconsistent("the GPT header's checksum is wrong")
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
    if not 128 <= entry_size <= 4096 or entry_size & (entry_size - 1) or count > 4096:
        # (at most 16 MiB of entries: a header naming 4096 entries of 2 GiB each would have
        # the image read into memory whole)
        raise Inconsistent("the GPT's partition entries are of an unusual size")
    table = read_exact(read_at, entries_lba * sector, count * entry_size, "the GPT's entries")
    if zlib.crc32(table) != entries_crc:
        raise Inconsistent("the GPT's partition entries' checksum is wrong")
    parts: list[Partition] = []
    for i in range(count):
        entry = table[i * entry_size : (i + 1) * entry_size]
        if entry[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last < first:
            raise Inconsistent(f"GPT partition {i + 1} ends before it begins")
        parts.append(Partition(first * sector, (last - first + 1) * sector,
                               f"partition {i + 1}"))
    return Table("gpt", _checked(parts, size))


def _logical(read_at: ReadAt, start: int, sector: int) -> list[Partition]:
    """The chain of EBRs of an extended partition at LBA ``start``."""
    parts: list[Partition] = []
    ebr = start
    seen = set()
    while len(parts) < _MAX_LOGICAL:
        if ebr in seen:
            raise Inconsistent("the extended partition's chain loops")
        seen.add(ebr)
        data = read_exact(read_at, ebr * sector, 512, "an extended boot record")
        if data[510:512] != b"\x55\xaa":
            raise Inconsistent("an extended boot record has no signature")
        entries = _mbr_entries(data)
        logical = [e for e in entries if e[0] not in _EXTENDED]
        nexts = [e for e in entries if e[0] in _EXTENDED]
        for _, first, count in logical:  # usually one; OS/2 used all four, as Linux reads
            parts.append(Partition((ebr + first) * sector, count * sector,
                                   f"partition {5 + len(parts)}"))
        if not nexts:
            return parts
        ebr = start + nexts[0][1]
    raise Inconsistent("the extended partition holds too many logical partitions")


def _checked(parts: list[Partition], size: int) -> tuple[Partition, ...]:
    ordered = sorted(parts, key=lambda p: p.offset)
    for part in ordered:
        if part.end > size:
            raise Inconsistent(f"{part.name} ends past the image's end")
    for before, after in itertools.pairwise(ordered):
        if after.offset < before.end:
            raise Inconsistent(f"{before.name} and {after.name} overlap")
    return tuple(ordered)


def read_table(read_at: ReadAt, size: int) -> Table:
    """The image's partitions (GPT before its protective MBR); ``none`` without a table."""
    mbr = read_at(0, 512)
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
        return Table("none", ())
    entries = _mbr_entries(mbr)
    if any(ptype == _PROTECTIVE for ptype, _, _ in entries):
        for sector in (512, 4096):
            gpt = _gpt(read_at, size, sector)
            if gpt is not None:
                return gpt
        raise Inconsistent("a protective MBR without a GPT")
    if any(e[2] and e[1] * 512 + e[2] * 512 > size for e in entries):
        return Table("none", ())  # not a table: a boot sector's code, or a bare file system
    parts: list[Partition] = []
    for i, (ptype, first, count) in enumerate(_mbr_entries(mbr)):
        if ptype in _EXTENDED:
            inside = _logical(read_at, first, 512)
            for part in inside:
                if part.offset < first * 512 or part.end > (first + count) * 512:
                    raise Inconsistent(f"{part.name} lies outside its extended partition")
            parts.extend(inside)
        else:
            parts.append(Partition(first * 512, count * 512, f"partition {i + 1}"))
    return Table("mbr", _checked(parts, size))
