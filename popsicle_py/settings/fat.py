"""Where the boot partition is, and an independent reader of its FAT file system.

Pure functions over bytes and a ``read(offset, length)`` callable: the partition tables (MBR,
GPT) of an image's first sectors, the FAT boot sector's geometry, the allocation table, and the
files of the root directory (long names included).  mtools writes the files; this reader, which
shares no code with it, reads them back.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable

from popsicle_py.records import record

__all__ = [
    "BootPartition",
    "FatError",
    "FatGeometry",
    "find_boot_partition",
    "free_clusters",
    "geometry",
    "read_fat",
    "root_files",
    "root_free_slots",
]

SECTOR = 512
#: MBR partition types of FAT file systems (FAT12, FAT16, FAT32, LBA, hidden, EFI).
FAT_TYPES = frozenset({0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E, 0x11, 0x14, 0x16, 0x1B, 0x1C,
                       0x1E, 0xEF})
GPT_FAT_GUIDS = frozenset({
    uuid.UUID("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),  # Microsoft basic data
    uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),  # EFI system partition
})
Read = Callable[[int, int], bytes]


class FatError(ValueError):
    """No FAT boot partition, or one this reader cannot make sense of."""


class PastDecoded(FatError):
    """A read of a compressed image past what is decoded to customise it (the rest is only
    ever streamed to the drives)."""


@record
class BootPartition:
    offset: int
    size: int
    number: int
    table: str  # "mbr" or "gpt"


@record
class FatGeometry:
    """A FAT file system's layout, in bytes from its start."""

    bits: int  # 12, 16 or 32
    sector: int
    cluster: int
    reserved: int  # bytes before the first FAT
    fat_size: int  # bytes of one FAT
    fats: int
    root_offset: int  # FAT12/16: the fixed root directory; FAT32: the data region
    root_size: int  # FAT12/16 only
    data_offset: int
    clusters: int
    root_cluster: int  # FAT32 only
    fsinfo: int | None  # byte offset of FAT32's FSInfo sector
    total: int  # bytes the file system claims

    def cluster_offset(self, number: int) -> int:
        return self.data_offset + (number - 2) * self.cluster


def _is_fat(boot: bytes) -> bool:
    return (len(boot) >= SECTOR and boot[510:512] == b"\x55\xaa"
            and (boot[54:59] == b"FAT12" or boot[54:59] == b"FAT16" or boot[82:87] == b"FAT32"
                 or boot[54:57] == b"FAT"))


def find_boot_partition(read: Read) -> BootPartition:
    """The first FAT partition of an MBR or GPT disk (GPT when its protective MBR says so)."""
    mbr = read(0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        raise FatError("the image has no partition table (MBR or GPT)")
    entries = [struct.unpack_from("<B3xB3xII", mbr, 446 + 16 * i) for i in range(4)]
    if any(kind == 0xEE for _, kind, _, _ in entries):
        return _gpt(read)
    for number, (_, kind, start, count) in enumerate(entries, 1):
        if kind in FAT_TYPES and count and _is_fat(read(start * SECTOR, SECTOR)):
            _alone(number, start, count,
                   [(n, s, c) for n, (_, k, s, c) in enumerate(entries, 1) if k and c])
            return BootPartition(start * SECTOR, count * SECTOR, number, "mbr")
    raise FatError("the image has no FAT boot partition")


def _alone(number: int, first: int, count: int, others: list[tuple[int, int, int]]) -> None:
    """The boot partition (sectors ``first`` .. ``first + count``) shares no sector with any
    other partition of the table ((number, first, count) each): mtools may put a file in any
    cluster its FAT says is free, and a cluster another partition holds would be written over
    after that partition was verified."""
    for other, start, length in others:
        if other != number and start < first + count and first < start + length:
            raise FatError(f"its boot partition (partition {number}) overlaps partition "
                           f"{other}: a file written to it could land in the other")


def _gpt(read: Read) -> BootPartition:
    header = read(SECTOR, 92)
    if header[:8] != b"EFI PART":
        raise FatError("the image's GPT header is missing")
    if len(header) < 92:
        raise FatError("the image's GPT header is cut short")
    usable_first, usable_last = struct.unpack_from("<QQ", header, 40)
    entries_lba, count, size = struct.unpack_from("<QII", header, 72)
    table = read(entries_lba * SECTOR, min(count, 128) * size)
    spans = []  # (number, first, count) of every partition in use
    for number in range(min(count, 128)):
        entry = table[number * size:(number + 1) * size]
        if len(entry) < 48:
            break
        first, last = struct.unpack_from("<QQ", entry, 32)
        if any(entry[:16]):
            spans.append((number + 1, first, max(0, last - first + 1)))
    for number, first, length in spans:
        entry = table[(number - 1) * size:number * size]
        if uuid.UUID(bytes_le=entry[:16]) in GPT_FAT_GUIDS and length \
                and _is_fat(read(first * SECTOR, SECTOR)):
            if first < usable_first or first + length - 1 > usable_last:
                raise FatError(f"its boot partition (partition {number}) lies outside the "
                               "sectors its GPT header says partitions may use (over the "
                               "partition table itself)")
            _alone(number, first, length, spans)
            return BootPartition(first * SECTOR, length * SECTOR, number, "gpt")
    raise FatError("the image has no FAT boot partition")


def geometry(boot: bytes) -> FatGeometry:
    """The layout from a FAT boot sector (BIOS parameter block); raises :class:`FatError`
    when the numbers do not make a file system (no cluster, a FAT too small for its clusters,
    no data region), which nothing here could then read."""
    if len(boot) < SECTOR:
        raise FatError("the boot partition's FAT boot sector is cut short")
    (sector, per_cluster, reserved, fats, root_entries, total16, _, fat16, _, _, _,
     total32) = struct.unpack_from("<HBHBHHBHHHII", boot, 11)
    if sector not in (512, 1024, 2048, 4096) or per_cluster == 0 or fats == 0:
        raise FatError("the boot partition's FAT boot sector is not valid")
    fat32 = fat16 == 0
    fat_sectors = struct.unpack_from("<I", boot, 36)[0] if fat32 else fat16
    total = (total16 or total32) * sector
    root_size = ((root_entries * 32 + sector - 1) // sector) * sector
    first_fat = reserved * sector
    root_offset = first_fat + fats * fat_sectors * sector
    data = root_offset + root_size
    clusters = (total - data) // (per_cluster * sector)
    bits = 32 if fat32 else (12 if clusters < 4085 else 16)
    if clusters <= 0 or data >= total or fat_sectors * sector < -(-(clusters + 2) * bits // 8):
        raise FatError("the boot partition's FAT boot sector is not valid (its sizes do not "
                       "make a file system)")
    fsinfo_sector = struct.unpack_from("<H", boot, 48)[0] if fat32 else 0
    if fsinfo_sector in (0, 0xFFFF):  # none (as mtools and the kernel read them)
        fsinfo_sector = 0
    elif fsinfo_sector >= reserved:  # the write check would let a data block change
        raise FatError(f"the boot partition's FAT32 boot sector puts FSInfo at sector "
                       f"{fsinfo_sector}, outside its {reserved} reserved sectors (a damaged "
                       "image?)")
    return FatGeometry(bits, sector, per_cluster * sector, first_fat, fat_sectors * sector,
                       fats, root_offset, root_size, data, clusters,
                       struct.unpack_from("<I", boot, 44)[0] if fat32 else 0,
                       fsinfo_sector * sector if fsinfo_sector else None, total)


def read_fat(geo: FatGeometry, data: bytes) -> list[int]:
    """The first FAT as a list of entries (cluster -> next, 0 free); raises
    :class:`FatError` when ``data`` is shorter than the FAT (a truncated image)."""
    count = geo.clusters + 2
    if len(data) < -(-count * geo.bits // 8):
        raise FatError("the boot partition's FAT is cut short")
    if geo.bits == 32:
        return [v & 0x0FFFFFFF for v in struct.unpack_from(f"<{count}I", data)]
    if geo.bits == 16:
        return list(struct.unpack_from(f"<{count}H", data))
    out = []
    for n in range(count):
        pair = int.from_bytes(data[n * 3 // 2:n * 3 // 2 + 2], "little")
        out.append(pair >> 4 if n & 1 else pair & 0xFFF)
    return out


def chain(geo: FatGeometry, fat: list[int], first: int) -> list[int]:
    """The clusters of a file or directory, in order."""
    end = {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}[geo.bits]
    out: list[int] = []
    cluster = first
    while 2 <= cluster < end and len(out) <= geo.clusters:
        if cluster >= len(fat):
            raise FatError(f"cluster {cluster} is past the end of the file system")
        out.append(cluster)
        cluster = fat[cluster]
    if len(out) > geo.clusters:
        raise FatError("a cluster chain loops")
    return out


@record
class Entry:
    name: str
    first: int
    size: int
    directory: bool
    #: The 32 bytes of its short entry (name, attributes, times, first cluster, size).
    raw: bytes = b""


def _entries(raw: bytes) -> list[Entry]:
    out: list[Entry] = []
    long: dict[int, str] = {}
    for at in range(0, len(raw) - 31, 32):
        record = raw[at:at + 32]
        if record[0] == 0:
            break
        if record[0] == 0xE5:
            long = {}
            continue
        if record[11] == 0x0F:  # a piece of a long name
            order = record[0] & 0x1F
            text = (record[1:11] + record[14:26] + record[28:32]).decode("utf-16-le", "replace")
            long[order] = text.split("\x00")[0]
            continue
        if record[11] & 0x08:  # the volume label
            long = {}
            continue
        short = record[:8].decode("latin-1").rstrip()
        ext = record[8:11].decode("latin-1").rstrip()
        name = "".join(long[k] for k in sorted(long)) if long else \
            (short + ("." + ext if ext else ""))
        first = struct.unpack_from("<H", record, 26)[0] | \
            (struct.unpack_from("<H", record, 20)[0] << 16)
        out.append(Entry(name, first, struct.unpack_from("<I", record, 28)[0],
                         bool(record[11] & 0x10), bytes(record)))
        long = {}
    return out


def root_clusters(geo: FatGeometry, fat: list[int]) -> list[int]:
    return chain(geo, fat, geo.root_cluster) if geo.bits == 32 else []


def _root_raw(geo: FatGeometry, fat: list[int], read: Read) -> bytes:
    if geo.bits == 32:
        return b"".join(read(geo.cluster_offset(c), geo.cluster)
                        for c in root_clusters(geo, fat))
    return read(geo.root_offset, geo.root_size)


def root_entries(geo: FatGeometry, fat: list[int], read: Read) -> list[Entry]:
    return _entries(_root_raw(geo, fat, read))


def root_free_slots(geo: FatGeometry, fat: list[int], read: Read) -> int:
    """The root directory's free 32-byte slots after its last entry (those after the first
    end mark); slots of deleted entries are not counted (a writer may not reuse them)."""
    raw = _root_raw(geo, fat, read)
    end = next((at for at in range(0, len(raw) - 31, 32) if raw[at] == 0), len(raw))
    return (len(raw) - end) // 32


def free_clusters(geo: FatGeometry, fat: list[int], fsinfo: bytes | None = None) -> int:
    """Clusters the FAT says are free; FAT32: no more than FSInfo's free count when it has
    one (mtools trusts that count and says "Disk full" by it)."""
    free = sum(1 for entry in fat[2:geo.clusters + 2] if entry == 0)
    if fsinfo is not None and len(fsinfo) >= SECTOR and fsinfo[:4] == b"RRaA" \
            and fsinfo[484:488] == b"rrAa":
        said = struct.unpack_from("<I", fsinfo, 488)[0]
        if said <= geo.clusters:
            free = min(free, said)
    return free


def directory_clusters(geo: FatGeometry, fat: list[int], read: Read) -> set[int]:
    """Every cluster of every directory (the root's too, on FAT32): what ``fsck.vfat -n``
    reads besides the region before the data."""
    out = set(root_clusters(geo, fat))
    todo = [e for e in root_entries(geo, fat, read) if e.directory]
    while todo:
        entry = todo.pop()
        if entry.name in (".", "..") or entry.first < 2 or entry.first in out:
            continue
        clusters = chain(geo, fat, entry.first)
        out.update(clusters)
        raw = b"".join(read(geo.cluster_offset(c), geo.cluster) for c in clusters)
        todo.extend(e for e in _entries(raw) if e.directory)
    return out


def root_files(geo: FatGeometry, fat: list[int], read: Read,
               names: set[str] | None = None) -> dict[str, tuple[bytes, list[int]]]:
    """Files of the root directory (the ``names`` given, case-insensitively, or all): their
    content and their clusters."""
    wanted = {n.lower() for n in names} if names is not None else None
    out: dict[str, tuple[bytes, list[int]]] = {}
    for entry in root_entries(geo, fat, read):
        if entry.directory or (wanted is not None and entry.name.lower() not in wanted):
            continue
        clusters = chain(geo, fat, entry.first) if entry.size else []
        if len(clusters) * geo.cluster < entry.size:
            raise FatError(f"{entry.name}: its clusters hold less than its size")
        data = b"".join(read(geo.cluster_offset(c), geo.cluster) for c in clusters)
        out[entry.name] = (data[:entry.size], clusters)
    return out
