"""FAT12/16/32: the reserved area, the FATs and the root directory whole, then every cluster
whose FAT entry is not free.

The copies of the FAT must agree and every entry must be free, a cluster number within the
volume, end of chain or bad; otherwise the partition is written whole.  So is a volume marked
dirty (not cleanly unmounted: Linux's flag in the boot sector, Windows' clean-shutdown bit in
FAT entry 1): its FAT may lag behind the clusters its files already use.
"""

from __future__ import annotations

import struct

from popsicle_py.records import record
from popsicle_py.usage.ranges import Inconsistent, Range, ReadAt, Unsupported, read_exact


@record
class _Bpb:
    sector: int
    per_cluster: int
    reserved: int
    fats: int
    root_entries: int
    total: int
    fat_sectors: int
    fat32: bool
    dirty: bool  # the boot sector's state flag (Linux's FAT_STATE_DIRTY, Windows' too)


def _bpb(boot: bytes) -> _Bpb | None:
    """The BIOS parameter block, if ``boot`` is a FAT boot sector at all."""
    if len(boot) < 512 or boot[0] not in (0xEB, 0xE9) or boot[510:512] != b"\x55\xaa":
        return None
    sector, per_cluster, reserved, fats, root_entries, total16 = struct.unpack_from(
        "<HBHBHH", boot, 11)
    fat16, = struct.unpack_from("<H", boot, 22)
    total32, fat32 = struct.unpack_from("<I", boot, 32)[0], struct.unpack_from("<I", boot, 36)[0]
    if sector not in (512, 1024, 2048, 4096) or per_cluster not in (1, 2, 4, 8, 16, 32, 64, 128):
        return None
    if reserved == 0 or fats not in (1, 2):
        return None
    total = total16 or total32
    fat_sectors = fat16 or fat32
    if not total or not fat_sectors:
        return None
    state = boot[0x41 if fat16 == 0 else 0x25]
    return _Bpb(sector, per_cluster, reserved, fats, root_entries, total, fat_sectors,
                fat16 == 0, bool(state & 0x01))


def is_fat(read_at: ReadAt, offset: int) -> bool:
    """A FAT boot sector (its jump, signature and a sane parameter block) at ``offset``."""
    return _bpb(read_at(offset, 512)) is not None


def used_ranges(read_at: ReadAt, offset: int, length: int) -> tuple[list[Range], str]:
    """Byte ranges (in the image) of the FAT volume at ``offset`` that hold anything it uses,
    and a description ("FAT32, 4 KiB clusters"); raises Inconsistent."""
    bpb = _bpb(read_exact(read_at, offset, 512, "the FAT boot sector"))
    if bpb is None:
        raise Inconsistent("its boot sector is not a FAT one")
    ss = bpb.sector
    if bpb.total * ss > length:
        raise Inconsistent(f"it holds {bpb.total * ss} bytes, more than its partition's "
                           f"{length}")
    root_sectors = -(-bpb.root_entries * 32 // ss)
    data = bpb.reserved + bpb.fats * bpb.fat_sectors + root_sectors
    if data >= bpb.total:
        raise Inconsistent("its data area is empty")
    clusters = (bpb.total - data) // bpb.per_cluster
    # As Linux and fsck.fat decide: FAT32 when the 16-bit FAT size is 0, else by clusters.
    bits = 32 if bpb.fat32 else 12 if clusters < 4085 else 16
    if (bits == 32) != (bpb.root_entries == 0):
        raise Inconsistent("its root directory does not fit its FAT type")
    fat_bytes = -(-(clusters + 2) * bits // 8)  # the entries in use: a FAT may be longer
    if fat_bytes > bpb.fat_sectors * ss:
        raise Inconsistent("its FAT is too small for its clusters")
    fat = read_exact(read_at, offset + bpb.reserved * ss, fat_bytes, "the FAT")
    for copy in range(1, bpb.fats):
        other = read_exact(read_at, offset + (bpb.reserved + copy * bpb.fat_sectors) * ss,
                           fat_bytes, "a copy of the FAT")
        if other != fat:
            raise Inconsistent("its copies of the FAT differ")
    if bpb.dirty or _unclean(fat, bits):
        # Mounted read-write and never unmounted (a stick pulled out, an image taken of a
        # mounted volume): files' clusters may not be in the FAT yet.
        raise Unsupported("it was not cleanly unmounted (marked dirty; fsck.fat has not "
                          "repaired it)")
    runs = _used_runs(fat, bits, clusters)
    cluster = bpb.per_cluster * ss
    base = offset + data * ss
    ranges: list[Range] = [(offset, data * ss)]
    ranges.extend((base + first * cluster, n * cluster) for first, n in runs)
    end = data * ss + clusters * cluster
    ranges.append((offset + end, length - end))  # past the last cluster
    free = (clusters - sum(n for _, n in runs)) * cluster
    return ranges, f"FAT{bits}, {cluster} byte clusters, {free} bytes free"


def _unclean(fat: bytes, bits: int) -> bool:
    """FAT entry 1's clean-shutdown bit cleared (FAT16 and FAT32; Windows clears it while the
    volume is mounted)."""
    if bits == 16:
        return not struct.unpack_from("<H", fat, 2)[0] & 0x8000
    if bits == 32:
        return not struct.unpack_from("<I", fat, 4)[0] & 0x08000000
    return False


def _used_runs(fat: bytes, bits: int, clusters: int) -> list[Range]:
    """(first, count) of each run of data clusters (cluster 2 is 0) whose entry is not free."""
    top = clusters + 1  # highest valid cluster number
    if bits == 12:
        values = []
        for i in range(2, clusters + 2):
            pair, = struct.unpack_from("<H", fat, i * 3 // 2)
            values.append(pair >> 4 if i & 1 else pair & 0xFFF)
        bad, eoc = 0xFF7, 0xFF8
    elif bits == 16:
        values = list(struct.unpack_from(f"<{clusters}H", fat, 4))
        bad, eoc = 0xFFF7, 0xFFF8
    else:
        values = [v & 0x0FFFFFFF for v in struct.unpack_from(f"<{clusters}I", fat, 8)]
        bad, eoc = 0x0FFFFFF7, 0x0FFFFFF8
    runs: list[Range] = []
    start = -1
    for index, value in enumerate(values):
        if value == 0:
            if start >= 0:
                runs.append((start, index - start))
                start = -1
            continue
        if not (2 <= value <= top or value == bad or value >= eoc):
            raise Inconsistent(f"the FAT entry of cluster {index + 2} points nowhere "
                               f"({value:#x})")
        if start < 0:
            start = index
    if start >= 0:
        runs.append((start, clusters - start))
    return runs
