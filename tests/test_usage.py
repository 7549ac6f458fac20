"""What an image's file systems use (popsicle_py.usage), on images made by the real tools.

Each image's free space holds random bytes from before mkfs and deleted files' data; a copy
that gets only the ranges found (over other random bytes, as a drive's old content) must pass
e2fsck -fn / fsck.vfat -n and give the same files through debugfs / mtools.
"""

from __future__ import annotations

import random
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from popsicle_py.usage import ext, image_usage
from popsicle_py.usage.ranges import bit_runs, normalize
from tests.fs_images import (
    MiB,
    e2fsck,
    ext_files,
    fat_files,
    fsck_vfat,
    garbage,
    make_ext,
    make_fat,
    needs_fs_tools,
    partition,
    rpi_image,
    run,
    tree,
    trimmed_copy,
    usage_of,
)

pytestmark = needs_fs_tools


@pytest.fixture
def content(tmp_path: Path) -> Iterator[tuple[Path, Path, dict[str, str]]]:
    """Files to keep, files to delete (their data left in free space), the kept files' sums."""
    keep, gone = tmp_path / "keep", tmp_path / "gone"
    sums = tree(keep)
    tree(gone, files=6, size=3 << 20, seed=3)
    shutil.rmtree(gone / "sub")
    yield keep, gone, sums


def dumpe2fs_used(image: Path) -> set[int]:
    """The blocks dumpe2fs says are in use, block 0 up to the superblock's included."""
    out = run("dumpe2fs", str(image)).stdout
    blocks = int(re.search(r"Block count:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    first = int(re.search(r"First block:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    used = set(range(blocks))
    for line in re.findall(r"^\s+Free blocks: (.*)$", out, re.M):
        for part in filter(None, (p.strip() for p in line.split(","))):
            a, _, b = part.partition("-")
            used -= set(range(int(a), int(b or a) + 1))
    return used | set(range(first + 1))


def ranges_blocks(ranges: list[tuple[int, int]], block: int, end: int) -> set[int]:
    out: set[int] = set()
    for offset, length in ranges:
        out |= set(range(offset // block, min(end, offset + length) // block))
    return out


EXT_CASES = [
    ("ext4", ["-b", "4096", "-g", "4096"]),
    ("ext4", ["-b", "1024"]),
    ("ext4", ["-b", "4096", "-g", "4096", "-O", "^flex_bg"]),
    ("ext4", ["-b", "1024", "-O", "^flex_bg"]),
    ("ext4", ["-b", "1024", "-O", "^metadata_csum,uninit_bg"]),
    ("ext4", ["-b", "4096", "-g", "4096", "-O", "^metadata_csum,^uninit_bg,^64bit"]),
    ("ext4", ["-b", "1024", "-O", "sparse_super2"]),
    ("ext3", ["-b", "1024"]),
    ("ext2", ["-b", "4096", "-g", "8192"]),
]


@pytest.mark.parametrize(("fstype", "options"), EXT_CASES, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else v)
def test_ext_used_blocks_are_exactly_the_allocated_ones(tmp_path: Path, content: tuple[
        Path, Path, dict[str, str]], fstype: str, options: list[str]) -> None:
    keep, gone, sums = content
    size = 96 * MiB
    image = tmp_path / "ext.img"
    garbage(image, size)
    make_ext(image, 0, size, keep, options=options, deleted=gone, fstype=fstype)
    with open(image, "rb") as f:
        def read_at(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)
        raw, what = ext.used_ranges(read_at, 0, size)
    block = 1024 if "1024" in options else 4096
    assert what.startswith(fstype), what
    assert ranges_blocks(raw, block, size) == dumpe2fs_used(image)
    groups = run("dumpe2fs", str(image)).stdout
    assert groups.count("Group ") > 3
    if fstype == "ext4" and "^uninit_bg" not in " ".join(options):
        assert "BLOCK_UNINIT" in groups  # groups without a bitmap on disk are covered

    usage = usage_of(image)
    assert usage.notes == ()
    assert usage.skipped > size // 2, usage  # deleted files' data is not written
    copy = tmp_path / "drive.img"
    trimmed_copy(image, usage.ranges, copy)
    fsck = e2fsck(copy, 0, size)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert ext_files(copy, 0, size, list(sums)) == sums


@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_partitioned_image_fat_and_ext(tmp_path: Path, content: tuple[Path, Path, dict[
        str, str]], label: str) -> None:
    keep, gone, sums = content
    image, fat_at, ext_at = rpi_image(tmp_path, keep, gone, label)
    usage = usage_of(image)
    assert usage.notes == ()
    assert [line.split(":")[0] for line in usage.found] == ["partition 1", "partition 2"]
    assert "FAT32" in usage.found[0] and "ext4" in usage.found[1]
    assert usage.skipped > 100 * MiB
    data = image.read_bytes()
    # Outside the partitions every byte is written: tables, the gap, the backup GPT.
    assert usage.ranges[0][0] == 0 and usage.ranges[0][1] >= fat_at
    assert usage.ranges[-1][0] + usage.ranges[-1][1] == len(data)
    copy = tmp_path / "drive.img"
    trimmed_copy(image, usage.ranges, copy)
    assert copy.read_bytes()[:fat_at] == data[:fat_at]
    assert fsck_vfat(copy, fat_at, 48 * MiB).returncode == 0
    assert fat_files(copy, fat_at, list(sums)) == sums
    assert e2fsck(copy, ext_at, 104 * MiB).returncode == 0
    assert ext_files(copy, ext_at, 104 * MiB, list(sums)) == sums


def test_logical_partitions_and_an_unknown_one(tmp_path: Path, content: tuple[
        Path, Path, dict[str, str]]) -> None:
    keep, gone, sums = content
    image = tmp_path / "logical.img"
    garbage(image, 80 * MiB)
    # p1: unknown data (swap-like), p2: extended holding p5 (ext4) and p6 (FAT16).
    partition(image, "2048,16384,82\n20480,,5\n22528,40960,83\n65536,,e\n")
    make_ext(image, 22528 * 512, 40960 * 512, keep, options=["-b", "1024"], deleted=gone)
    p6 = run("sfdisk", "-d", str(image)).stdout
    start = int(re.findall(r"start=\s*(\d+)", p6)[-1])
    length = int(re.findall(r"size=\s*(\d+)", p6)[-1])
    make_fat(image, start * 512, length * 512, keep, ["-F", "16"])
    usage = usage_of(image)
    assert [line.split(":")[0] for line in usage.found] == ["partition 5", "partition 6"]
    assert usage.notes == ("partition 1: no ext2/3/4 or FAT file system: written whole",)
    assert (1 * MiB, 8 * MiB) in [(o, n) for o, n in usage.ranges] or \
        any(o <= MiB and o + n >= 9 * MiB for o, n in usage.ranges)
    copy = tmp_path / "drive.img"
    trimmed_copy(image, usage.ranges, copy)
    assert copy.read_bytes()[MiB : 9 * MiB] == image.read_bytes()[MiB : 9 * MiB]
    assert e2fsck(copy, 22528 * 512, 40960 * 512).returncode == 0
    assert ext_files(copy, 22528 * 512, 40960 * 512, list(sums)) == sums
    assert fsck_vfat(copy, start * 512, length * 512).returncode == 0
    assert fat_files(copy, start * 512, list(sums)) == sums


@pytest.mark.parametrize("bits", ["12", "16", "32"])
def test_bare_fat_volume(tmp_path: Path, content: tuple[Path, Path, dict[str, str]],
                         bits: str) -> None:
    keep, _, sums = content
    size = {"12": 8, "16": 24, "32": 64}[bits] * MiB
    image = tmp_path / "fat.img"
    garbage(image, size)
    make_fat(image, 0, size, keep, ["-F", bits, *(["-s", "4"] if bits == "12" else [])])
    usage = usage_of(image)
    assert usage.notes == () and usage.found[0].startswith(f"the image: FAT{bits}")
    copy = tmp_path / "drive.img"
    trimmed_copy(image, usage.ranges, copy)
    assert fsck_vfat(copy, 0, size).returncode == 0
    assert fat_files(copy, 0, list(sums)) == sums
    if bits != "12":  # 8 MiB is mostly files here
        assert usage.skipped > size // 4


def _group0_bitmap(image: Path, offset: int, length: int) -> int:
    part = image.with_suffix(".p")
    with open(image, "rb") as f:
        f.seek(offset)
        part.write_bytes(f.read(length))
    out = run("dumpe2fs", str(part)).stdout
    part.unlink()
    return int(re.search(r"Block bitmap at (\d+)", out).group(1))  # type: ignore[union-attr]


@pytest.mark.parametrize("options", [["-b", "4096"], ["-b", "1024", "-O",
                                                       "^metadata_csum,uninit_bg"]],
                         ids=["metadata_csum", "uninit_bg"])
def test_corrupt_bitmap_writes_the_partition_whole(tmp_path: Path, content: tuple[
        Path, Path, dict[str, str]], options: list[str]) -> None:
    keep, gone, _ = content
    image, _, ext_at = rpi_image(tmp_path, keep, gone)
    ext_len = 104 * MiB
    if options != ["-b", "4096"]:
        make_ext(image, ext_at, ext_len, keep, options=options, deleted=gone)
    block = int(options[1])
    where = ext_at + _group0_bitmap(image, ext_at, ext_len) * block + 500
    with open(image, "r+b") as f:  # free blocks marked in use: a count that disagrees
        f.seek(where)
        f.write(b"\xff" if f.read(1) != b"\xff" else b"\x00")
    usage = usage_of(image)
    assert len(usage.notes) == 1 and usage.notes[0].startswith("partition 2: group 0's block "
                                                               "bitmap"), usage.notes
    assert usage.notes[0].endswith(": written whole")
    assert any(o <= ext_at and o + n >= ext_at + ext_len for o, n in usage.ranges)
    assert "FAT32" in usage.found[0]  # the other partition is still trimmed


def test_fat_copies_that_differ_write_it_whole(tmp_path: Path, content: tuple[
        Path, Path, dict[str, str]]) -> None:
    keep, _, _ = content
    image = tmp_path / "fat.img"
    garbage(image, 24 * MiB)
    make_fat(image, 0, 24 * MiB, keep, ["-F", "16"])
    boot = image.read_bytes()[:512]
    reserved, = struct.unpack_from("<H", boot, 14)
    with open(image, "r+b") as f:
        f.seek(reserved * 512 + 200)  # an entry of the first FAT only
        f.write(b"\x34\x12")
    usage = usage_of(image)
    assert usage.notes == ("the image: its copies of the FAT differ: written whole",)
    assert usage.ranges == ((0, 24 * MiB),)


def test_unclean_ext_and_broken_tables_are_written_whole(tmp_path: Path, content: tuple[
        Path, Path, dict[str, str]]) -> None:
    keep, _, _ = content
    image = tmp_path / "ext.img"
    garbage(image, 32 * MiB)
    make_ext(image, 0, 32 * MiB, keep, options=["-b", "4096"])
    with open(image, "r+b") as f:
        f.seek(1024 + 0x3A)
        f.write(struct.pack("<H", 0))  # state: not cleanly unmounted
    usage = usage_of(image)
    assert usage.ranges == ((0, 32 * MiB),)
    assert "not cleanly unmounted" in usage.notes[0]
    # A partition that runs past the image's end: not a table to believe.
    image2 = tmp_path / "overlap.img"
    garbage(image2, 16 * MiB)
    partition(image2, "2048,8192,83\n12288,8192,83\n")
    mbr = bytearray(image2.read_bytes()[:512])
    struct.pack_into("<I", mbr, 446 + 16 + 8, 4096)  # p2 now overlaps p1
    with open(image2, "r+b") as f:
        f.write(mbr)
    usage2 = usage_of(image2)
    assert usage2.ranges == ((0, 16 * MiB),)
    assert "overlap" in usage2.notes[0]


@pytest.mark.parametrize("field", ["state 3", "error_count 1"], ids=["state", "count"])
def test_ext_that_records_errors_is_written_whole(tmp_path: Path, content: tuple[
        Path, Path, dict[str, str]], field: str) -> None:
    """The kernel marks a file system it found damaged ("clean with errors", an error count):
    its bitmaps may leave out blocks that files still use, so they are not believed.
    (Before: trusted, and a file whose blocks the bitmap had lost read back as the drive's
    old bytes, while the drive said ok.)"""
    keep, _, _ = content
    image = tmp_path / "ext.img"
    garbage(image, 32 * MiB)
    make_ext(image, 0, 32 * MiB, keep, options=["-b", "4096"])
    run("debugfs", "-w", "-R", f"ssv {field}", str(image))  # checksums kept right
    assert e2fsck(image, 0, 32 * MiB).returncode != 4  # still a readable file system
    usage = usage_of(image)
    assert usage.ranges == ((0, 32 * MiB),)
    assert usage.notes == ("the image: it records file system errors (e2fsck has not "
                           "repaired it): written whole",)


def _mbr_entry(image: Path, sector: int, index: int, ptype: int, first: int,
               count: int) -> None:
    """Entry ``index`` of the boot record at ``sector`` of ``image`` set by hand."""
    with open(image, "r+b") as f:
        f.seek(sector * 512 + 446 + 16 * index + 4)
        f.write(bytes([ptype]) + bytes(3))
        f.write(struct.pack("<II", first, count))


@pytest.mark.parametrize("where", ["type 0 primary", "second logical of one EBR"])
def test_every_entry_linux_reads_is_a_partition(tmp_path: Path, content: tuple[
        Path, Path, dict[str, str]], where: str) -> None:
    """A primary entry of type 0 with a size, and a second data entry in one extended boot
    record, are partitions to Linux (partx lists them, the kernel mounts them).  Their file
    systems come through trim whole.  (Before: neither was seen, and a FAT volume in one read
    back as the drive's old bytes, "non DOS media".)"""
    keep, _, sums = content
    image = tmp_path / "table.img"
    garbage(image, 80 * MiB)
    fat_at = 40960
    if where == "type 0 primary":
        partition(image, "2048,32768,83\n")
        _mbr_entry(image, 0, 1, 0x00, fat_at, 32768)
    else:  # an extended partition from 1 MiB: its EBR at 2048, p5 at 4096
        partition(image, "2048,,5\n4096,32768,83\n")
        _mbr_entry(image, 2048, 1, 0x0C, fat_at - 2048, 32768)
    listed = run("partx", "-g", "-o", "START", str(image)).stdout.split()
    assert str(fat_at) in listed, listed  # Linux reads it
    ext_at = 2048 * 512 if where == "type 0 primary" else 4096 * 512
    make_ext(image, ext_at, 32768 * 512, keep, options=["-b", "1024"])
    make_fat(image, fat_at * 512, 32768 * 512, keep, ["-F", "16"])
    usage = usage_of(image)
    assert len(usage.found) == 2 and "FAT16" in usage.found[1], usage.found
    copy = tmp_path / "drive.img"
    trimmed_copy(image, usage.ranges, copy)
    assert fsck_vfat(copy, fat_at * 512, 32768 * 512).returncode == 0
    assert fat_files(copy, fat_at * 512, list(sums)) == sums


def test_an_image_without_file_systems_is_written_whole(tmp_path: Path) -> None:
    image = tmp_path / "random.img"
    garbage(image, 4 * MiB)
    usage = usage_of(image)
    assert usage.ranges == ((0, 4 * MiB),) and usage.notes == () and usage.skipped == 0


def test_normalize_aligns_merges_and_clips() -> None:
    assert normalize([(5000, 10), (0, 512)], 1 << 30, gap=0) == ((0, 8192),)
    assert normalize([(0, 4096), (8192, 4096)], 1 << 30, gap=4096) == ((0, 12288),)
    assert normalize([(0, 4096), (2 * MiB, 4096)], 1 << 30) == ((0, 4096), (2 * MiB, 4096))
    assert normalize([(10000, 100)], 10050) == ((8192, 1858),)
    assert list(bit_runs(bytes([0b10110001, 0xFF]), 12)) == [(0, 1), (4, 2), (7, 5)]


@pytest.mark.skipif(shutil.which("xorriso") is None, reason="needs xorriso")
def test_a_hybrid_iso_with_a_fat_partition_is_written_whole(
        tmp_path: Path, content: tuple[Path, Path, dict[str, str]]) -> None:
    """An ISO 9660 file may cover a partition appended to it (an EFI image): its free space
    is then bytes the ISO's file system reads, and a checksum of that file would differ."""
    keep, _, _ = content
    efi = tmp_path / "efi.img"
    garbage(efi, 8 * MiB)
    make_fat(efi, 0, 8 * MiB, keep, ["-F", "12", "-s", "4"])
    assert usage_of(efi).skipped > 0  # alone, its free space would be skipped
    iso = tmp_path / "hybrid.iso"
    run("xorriso", "-as", "mkisofs", "-o", str(iso), "-append_partition", "2", "0xef",
        str(efi), str(keep))
    usage = usage_of(iso)
    assert usage.ranges == ((0, iso.stat().st_size),)
    assert usage.notes == ("an ISO 9660 image: its files may lie anywhere, also in the free "
                           "space of a partition inside it: written whole",)


def test_damaged_metadata_never_raises(tmp_path: Path, content: tuple[
        Path, Path, dict[str, str]]) -> None:
    """Random bytes changed in the tables and the file systems' metadata: a usage (written
    whole where it makes no sense), never an exception, and ranges inside the image."""
    keep, gone, _ = content
    image, fat_at, ext_at = rpi_image(tmp_path, keep, gone, "gpt")
    data = bytearray(image.read_bytes())
    rng = random.Random(5)
    areas = [(0, 20 << 10), (fat_at, 512), (fat_at, 2 * MiB), (ext_at + 1024, 1024),
             (ext_at, 2 * MiB)]

    def read_at(offset: int, length: int) -> bytes:
        return bytes(data[offset : offset + length])

    for _ in range(400):
        changed = []
        for _ in range(rng.randrange(1, 6)):
            start, length = rng.choice(areas)
            where = start + rng.randrange(length)
            changed.append((where, data[where]))
            data[where] = rng.randrange(256)
        usage = image_usage(read_at, len(data))
        end = 0
        for offset, length in usage.ranges:
            assert offset >= end and length > 0
            end = offset + length
        assert end <= len(data)
        for where, byte in reversed(changed):
            data[where] = byte
