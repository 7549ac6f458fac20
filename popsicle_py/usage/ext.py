"""ext2/3/4: the blocks in use, from the block bitmaps, checked against the group descriptors.

Handled: 1-64 KiB blocks, 64-bit descriptors, flex_bg (bitmaps and inode tables of a group kept
in another), sparse_super/sparse_super2 backups, resize_inode's reserved descriptor blocks,
uninit_bg and metadata_csum (a BLOCK_UNINIT group's bitmap is not on disk: its used blocks are
computed as the kernel does, from the metadata that lies in it).  Every bitmap read is checked:
its checksum (metadata_csum), its count of free blocks against its descriptor's, and that it
marks the metadata lying in its group in use.  Anything else (meta_bg, bigalloc, a journal to
replay, unknown incompatible features, a descriptor whose checksum is wrong) raises, and the
partition is written whole.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable

from popsicle_py.records import record
from popsicle_py.usage.checksums import crc16, crc32c
from popsicle_py.usage.ranges import Inconsistent, Range, ReadAt, Unsupported, bit_runs, read_exact

MAGIC = 0xEF53
_SB = 1024

# Feature bits (see the kernel's fs/ext4/ext4.h).
_COMPAT_SPARSE_SUPER2 = 0x200
_INCOMPAT_RECOVER = 0x4
_INCOMPAT_JOURNAL_DEV = 0x8
_INCOMPAT_META_BG = 0x10
_INCOMPAT_64BIT = 0x80
_INCOMPAT_CSUM_SEED = 0x2000
_INCOMPAT_KNOWN = (0x2 | _INCOMPAT_RECOVER | 0x40 | _INCOMPAT_64BIT | 0x100 | 0x200 | 0x400
                   | 0x1000 | _INCOMPAT_CSUM_SEED | 0x4000 | 0x8000 | 0x10000 | 0x20000)
_RO_SPARSE_SUPER = 0x1
_RO_GDT_CSUM = 0x10
_RO_BIGALLOC = 0x200
_RO_METADATA_CSUM = 0x400
_RO_KNOWN = (_RO_SPARSE_SUPER | 0x2 | 0x4 | 0x8 | _RO_GDT_CSUM | 0x20 | 0x40 | 0x100
             | _RO_METADATA_CSUM | 0x1000 | 0x2000 | 0x8000 | 0x10000)
_BG_BLOCK_UNINIT = 0x2
_STATE_VALID = 0x1
_STATE_ERRORS = 0x2


def is_ext(read_at: ReadAt, offset: int) -> bool:
    """An ext2/3/4 superblock's magic at ``offset`` + 1080."""
    data = read_at(offset + _SB + 56, 2)
    return len(data) == 2 and struct.unpack("<H", data)[0] == MAGIC


@record
class _Super:
    block_size: int
    blocks: int
    first_data_block: int
    blocks_per_group: int
    groups: int
    desc_size: int
    reserved_gdt: int
    sparse_super: bool
    backups: tuple[int, ...] | None  # sparse_super2's two groups
    gdt_csum: bool
    metadata_csum: bool
    seed: int  # crc32c seed (metadata_csum)
    uuid: bytes


def _superblock(sb: bytes) -> _Super:
    (blocks_lo, first_data, log_block, log_cluster, per_group, state) = (
        struct.unpack_from("<I", sb, 0x4)[0], struct.unpack_from("<I", sb, 0x14)[0],
        struct.unpack_from("<I", sb, 0x18)[0], struct.unpack_from("<I", sb, 0x1C)[0],
        struct.unpack_from("<I", sb, 0x20)[0], struct.unpack_from("<H", sb, 0x3A)[0])
    rev = struct.unpack_from("<I", sb, 0x4C)[0]
    compat, incompat, ro = struct.unpack_from("<III", sb, 0x5C) if rev else (0, 0, 0)
    if state & _STATE_ERRORS or struct.unpack_from("<I", sb, 0x194)[0]:
        # The kernel found it damaged: its bitmaps may miss blocks that files still use.
        raise Unsupported("it records file system errors (e2fsck has not repaired it)")
    if incompat & _INCOMPAT_RECOVER or state != _STATE_VALID:
        raise Unsupported("it was not cleanly unmounted (its journal needs replaying)")
    if incompat & _INCOMPAT_JOURNAL_DEV:
        raise Unsupported("it is an external journal")
    if incompat & _INCOMPAT_META_BG:
        raise Unsupported("it uses meta_bg")
    if ro & _RO_BIGALLOC or log_cluster != log_block:
        raise Unsupported("it uses bigalloc")
    unknown_in, unknown_ro = incompat & ~_INCOMPAT_KNOWN, ro & ~_RO_KNOWN
    if unknown_in or unknown_ro:
        raise Unsupported(f"it has features not understood here "
                          f"(incompat {unknown_in:#x}, ro_compat {unknown_ro:#x})")
    if log_block > 6:
        raise Inconsistent("its block size is not possible")
    block_size = 1024 << log_block
    blocks = blocks_lo
    desc_size = 32
    if incompat & _INCOMPAT_64BIT:
        blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
        desc_size = struct.unpack_from("<H", sb, 0xFE)[0]
        if not 64 <= desc_size <= 1024 or desc_size & (desc_size - 1):  # the kernel's bounds
            raise Inconsistent("its group descriptor size is not possible")
    if not 256 <= per_group <= 8 * block_size or per_group % 8 \
            or first_data != (block_size == 1024):
        raise Inconsistent("its blocks per group or first data block are not possible")
    if blocks <= first_data:
        raise Inconsistent("it has no blocks")
    groups = -(-(blocks - first_data) // per_group)
    uuid = sb[0x68:0x78]
    metadata_csum = bool(ro & _RO_METADATA_CSUM)
    if metadata_csum:
        if sb[0x175] != 1:
            raise Unsupported("its checksum type is not crc32c")
        if crc32c(0xFFFFFFFF, sb[:0x3FC]) != struct.unpack_from("<I", sb, 0x3FC)[0]:
            raise Inconsistent("its superblock's checksum is wrong")
    seed = (struct.unpack_from("<I", sb, 0x270)[0] if incompat & _INCOMPAT_CSUM_SEED
            else crc32c(0xFFFFFFFF, uuid))
    backups = (tuple(struct.unpack_from("<II", sb, 0x24C)) if compat & _COMPAT_SPARSE_SUPER2
               else None)
    return _Super(block_size, blocks, first_data, per_group, groups, desc_size,
                  struct.unpack_from("<H", sb, 0xCE)[0], bool(ro & _RO_SPARSE_SUPER), backups,
                  bool(ro & _RO_GDT_CSUM), metadata_csum, seed, uuid)


@record
class _Group:
    block_bitmap: int
    inode_bitmap: int
    inode_table: int
    free_blocks: int
    flags: int
    bitmap_csum: int


def _descriptor(sup: _Super, raw: bytes, index: int) -> _Group:
    def field(lo_at: int, hi_at: int, fmt: str) -> int:
        lo: int = struct.unpack_from("<" + fmt, raw, lo_at)[0]
        if sup.desc_size >= 64:
            hi: int = struct.unpack_from("<" + fmt, raw, hi_at)[0]
            return lo | (hi << (32 if fmt == "I" else 16))
        return lo

    stored = struct.unpack_from("<H", raw, 0x1E)[0]
    if sup.metadata_csum:
        wanted = crc32c(sup.seed, struct.pack("<I", index) + raw[:0x1E] + b"\0\0"
                        + raw[0x20:]) & 0xFFFF
        if wanted != stored:
            raise Inconsistent(f"group {index}'s descriptor checksum is wrong")
    elif sup.gdt_csum:
        crc = crc16(crc16(crc16(0xFFFF, sup.uuid), struct.pack("<I", index)), raw[:0x1E])
        if len(raw) > 0x20:
            crc = crc16(crc, raw[0x20:])
        if crc != stored:
            raise Inconsistent(f"group {index}'s descriptor checksum is wrong")
    bitmap_csum = struct.unpack_from("<H", raw, 0x18)[0]
    if sup.desc_size >= 64:
        bitmap_csum |= struct.unpack_from("<H", raw, 0x38)[0] << 16
    flags = struct.unpack_from("<H", raw, 0x12)[0] if (sup.gdt_csum or sup.metadata_csum) else 0
    return _Group(field(0x0, 0x20, "I"), field(0x4, 0x24, "I"), field(0x8, 0x28, "I"),
                  field(0xC, 0x2C, "H"), flags, bitmap_csum)


def _has_backup(sup: _Super, group: int) -> bool:
    """Whether ``group`` holds a copy of the superblock and descriptors."""
    if group == 0:
        return True
    if sup.backups is not None:
        return group in sup.backups
    if not sup.sparse_super or group == 1:
        return True
    for base in (3, 5, 7):
        n = base
        while n < group:
            n *= base
        if n == group:
            return True
    return False


def _group_blocks(sup: _Super, group: int) -> int:
    if group < sup.groups - 1:
        return sup.blocks_per_group
    return sup.blocks - sup.first_data_block - group * sup.blocks_per_group


def _metadata(groups: list[_Group], itable_blocks: int) -> list[Range]:
    """(block, count) of every group's bitmaps and inode table, sorted by block."""
    return sorted(r for g in groups for r in ((g.block_bitmap, 1), (g.inode_bitmap, 1),
                                              (g.inode_table, itable_blocks)))


def _uninit_used(sup: _Super, group: int, meta: list[Range], gdt_blocks: int,
                 longest: int) -> Iterable[Range]:
    """A BLOCK_UNINIT group's used blocks, as the kernel computes them (in blocks): its copy
    of the superblock and descriptors, and any group's bitmaps and inode table inside it."""
    start = sup.first_data_block + group * sup.blocks_per_group
    end = start + _group_blocks(sup, group)
    if _has_backup(sup, group):
        yield start, 1 + gdt_blocks + sup.reserved_gdt
    index = bisect.bisect_left(meta, (start - longest, 0))
    while index < len(meta) and meta[index][0] < end:
        block, count = meta[index]
        if block + count > start:
            yield max(block, start), min(block + count, end) - max(block, start)
        index += 1


@record
class Layout:
    """An ext file system's superblock and group descriptors, read and checked: enough to know
    where each group lies and where its block bitmap is (read one group at a time when the
    image is a stream, see :mod:`.stream`)."""

    offset: int  # of the partition in the image
    length: int  # of the partition
    sup: _Super
    groups: tuple[_Group, ...]
    meta: list[Range]
    itable_blocks: int
    gdt_blocks: int
    kind: str

    @property
    def fixed(self) -> list[Range]:
        """Byte ranges used whatever the bitmaps say: the boot block and the superblock, and
        the partition's bytes past the file system's end."""
        bs = self.sup.block_size
        end = self.sup.blocks * bs
        return [(self.offset, (self.sup.first_data_block + 1) * bs),
                (self.offset + end, self.length - end)]

    def span(self, index: int) -> Range:
        """(offset, length) in the image of group ``index``'s blocks."""
        bs = self.sup.block_size
        start = self.sup.first_data_block + index * self.sup.blocks_per_group
        return self.offset + start * bs, _group_blocks(self.sup, index) * bs

    def bitmap(self, index: int) -> Range | None:
        """(offset, length) in the image of group ``index``'s block bitmap; None when it is
        not on disk (BLOCK_UNINIT); Inconsistent when it lies outside the file system."""
        group, sup = self.groups[index], self.sup
        if group.flags & _BG_BLOCK_UNINIT:
            return None
        if not sup.first_data_block <= group.block_bitmap < sup.blocks:
            raise Inconsistent(f"group {index}'s block bitmap lies outside the file system")
        return self.offset + group.block_bitmap * sup.block_size, sup.block_size

    def used(self, index: int, bitmap: bytes | None) -> tuple[list[Range], int]:
        """Byte ranges (in the image) group ``index`` uses, from its ``bitmap`` (None when
        :meth:`bitmap` is None), and its free blocks; raises Inconsistent."""
        sup, group = self.sup, self.groups[index]
        count = _group_blocks(sup, index)
        start = sup.first_data_block + index * sup.blocks_per_group
        if bitmap is None:
            found = list(_uninit_used(sup, index, self.meta, self.gdt_blocks,
                                      max(1, self.itable_blocks)))
            free = count - sum(n for _, n in _merged(found))
            if free != group.free_blocks:
                raise Inconsistent(f"group {index} is uninitialised but its free count "
                                   "disagrees with its metadata")
        else:
            if sup.metadata_csum:
                size = sup.blocks_per_group // 8
                want = crc32c(sup.seed, bitmap[:size])
                if sup.desc_size < 64:
                    want &= 0xFFFF
                if want != group.bitmap_csum:
                    raise Inconsistent(f"group {index}'s block bitmap checksum is wrong")
            runs = list(bit_runs(bitmap, count))
            free = count - sum(n for _, n in runs)
            if free != group.free_blocks:
                raise Inconsistent(f"group {index}'s block bitmap counts {free} free "
                                   f"blocks, its descriptor {group.free_blocks}")
            self._metadata_marked(index, start, count, bitmap)
            found = [(start + first, n) for first, n in runs]
        bs = sup.block_size
        return [(self.offset + b * bs, n * bs) for b, n in found], free


    def _metadata_marked(self, index: int, start: int, count: int, bitmap: bytes) -> None:
        """Inconsistent unless ``bitmap`` marks in use what the group's metadata takes (its
        superblock and descriptor copies, any group's bitmaps and inode table in it): a bitmap
        that calls them free, its counts made to agree, could as well miss files' data."""
        bits = int.from_bytes(bitmap, "little")
        for block, n in _uninit_used(self.sup, index, self.meta, self.gdt_blocks,
                                     max(1, self.itable_blocks)):
            first = block - start
            n = min(n, count - first)
            mask = ((1 << n) - 1) << first
            if n > 0 and bits & mask != mask:
                raise Inconsistent(f"group {index}'s block bitmap marks its own metadata "
                                   f"(block {block} on) free")


def layout(read_at: ReadAt, offset: int, length: int) -> Layout:
    """The superblock and group descriptors of the ext file system at ``offset``, checked;
    raises Unsupported or Inconsistent."""
    sb = read_exact(read_at, offset + _SB, 1024, "the ext superblock")
    sup = _superblock(sb)
    bs = sup.block_size
    if sup.blocks * bs > length:
        raise Inconsistent(f"it holds {sup.blocks * bs} bytes, more than its partition's "
                           f"{length}")
    inodes_per_group = struct.unpack_from("<I", sb, 0x28)[0]
    inode_size = struct.unpack_from("<H", sb, 0x58)[0] if struct.unpack_from(
        "<I", sb, 0x4C)[0] else 128
    itable_blocks = -(-inodes_per_group * inode_size // bs)
    gdt_blocks = -(-sup.groups * sup.desc_size // bs)
    table = read_exact(read_at, offset + (sup.first_data_block + 1) * bs,
                       sup.groups * sup.desc_size, "the ext group descriptors")
    groups = tuple(_descriptor(sup, table[i * sup.desc_size : (i + 1) * sup.desc_size], i)
                   for i in range(sup.groups))
    incompat = struct.unpack_from("<I", sb, 0x60)[0]
    journal = struct.unpack_from("<I", sb, 0x5C)[0] & 0x4
    kind = ("ext4" if incompat & ~0x2 or sup.gdt_csum or sup.metadata_csum
            else "ext3" if journal else "ext2")
    return Layout(offset, length, sup, groups, _metadata(list(groups), itable_blocks),
                  itable_blocks, gdt_blocks, kind)


def describe(lay: Layout, free_blocks: int) -> str:
    """"ext4, 4 KiB blocks, ... bytes free"."""
    bs = lay.sup.block_size
    return f"{lay.kind}, {bs // 1024} KiB blocks, {free_blocks * bs} bytes free"


def used_ranges(read_at: ReadAt, offset: int, length: int) -> tuple[list[Range], str]:
    """Byte ranges (in the image) of the ext file system at ``offset`` that hold anything it
    uses, and a description ("ext4, 4 KiB blocks"); raises Unsupported or Inconsistent."""
    lay = layout(read_at, offset, length)
    ranges = lay.fixed
    free_total = 0  # the superblock's own total is kept lazily by ext4: not a check
    for index in range(len(lay.groups)):
        where = lay.bitmap(index)
        bitmap = None if where is None else read_exact(
            read_at, where[0], where[1], f"group {index}'s block bitmap")
        used, free = lay.used(index, bitmap)
        ranges.extend(used)
        free_total += free
    return ranges, describe(lay, free_total)


def _merged(ranges: list[Range]) -> list[Range]:
    out: list[list[int]] = []
    for start, n in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], start + n)
        else:
            out.append([start, start + n])
    return [(a, b - a) for a, b in out]
