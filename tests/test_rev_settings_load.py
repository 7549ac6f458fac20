"""flash --customize refuses at load (one line, exit 2, the drive untouched) an image whose
boot files could land outside the boot partition, or whose boot FAT every drive would fail
``fsck.vfat -n`` on after its whole write."""

from __future__ import annotations

import re
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import pi_image
import pytest
from conftest import Loop
from test_customize_refusals import BOOT, MIB, _poke, _refused

pytestmark = pytest.mark.root


def _next_free(image: Path, cluster_at: int) -> None:
    """FSInfo's next-free hint of the FAT32 at BOOT pointed at the cluster ``cluster_at``
    bytes into the file system (mtools allocates from there)."""
    data = image.read_bytes()
    boot = data[BOOT:BOOT + 512]
    sector, per_cluster, reserved, fats = struct.unpack_from("<HBHB", boot, 11)
    fat_size = struct.unpack_from("<I", boot, 36)[0] * sector
    fsinfo = struct.unpack_from("<H", boot, 48)[0] * sector
    start = reserved * sector + fats * fat_size
    cluster = (cluster_at - start) // (per_cluster * sector) + 2
    _poke(image, BOOT + fsinfo + 492, struct.pack("<I", cluster))


def _fix_gpt_crcs(image: Path) -> None:
    data = bytearray(image.read_bytes())
    header = data[512:512 + 92]
    lba, count, size = struct.unpack_from("<QII", header, 72)
    table = data[lba * 512:lba * 512 + count * size]
    struct.pack_into("<I", header, 88, zlib.crc32(table))
    struct.pack_into("<I", header, 16, 0)
    struct.pack_into("<I", header, 16, zlib.crc32(header))
    _poke(image, 512, bytes(header))


@pytest.mark.parametrize("table", ["mbr", "gpt"])
def test_a_boot_partition_overlapping_another_is_refused(
        tmp_path: Path, table: str, loop_factory: Callable[..., Loop]) -> None:
    """The root partition moved to begin 4 MiB before the boot partition ends (over its free
    clusters), with FSInfo's hint there: mcopy put user-data in the root partition, after
    it was verified, and the drive was "ok"."""
    image = pi_image.build(tmp_path, table=table)  # boot at 4 MiB (40 MiB), root after it
    root = (tmp_path / "root.ext4").read_bytes()
    moved = BOOT + 36 * MIB
    _poke(image, moved, root)
    if table == "mbr":
        _poke(image, 446 + 16 + 8, struct.pack("<I", moved // 512))
    else:  # the second entry's first LBA, at the table of sfdisk's GPT (LBA 2)
        entry = 2 * 512 + 128
        last = struct.unpack_from("<Q", image.read_bytes(), entry + 40)[0]
        _poke(image, entry + 32, struct.pack("<QQ", moved // 512, last - 4 * MIB // 512))
        _fix_gpt_crcs(image)
        listed = subprocess.run(["sfdisk", "-d", str(image)], capture_output=True, text=True)
        assert re.search(rf"start=\s*{moved // 512},", listed.stdout), listed.stdout
    _next_free(image, 38 * MIB)
    line = _refused(tmp_path, image, loop_factory, "--customize-format", "cloud-init")
    assert "boot partition (partition 1) overlaps partition 2" in line, line



def test_a_gpt_boot_partition_over_the_table_itself_is_refused(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    """Its header says partitions end before the boot partition does (the rest is the
    backup table's): what mcopy puts there would be written over the GPT."""
    image = pi_image.build(tmp_path, table="gpt")
    _poke(image, 512 + 48, struct.pack("<Q", (BOOT + 20 * MIB) // 512))  # last usable LBA
    _fix_gpt_crcs(image)
    line = _refused(tmp_path, image, loop_factory, "--customize-format", "cloud-init")
    assert "lies outside the sectors its GPT header says partitions may use" in line, line

def _fats(image: Path) -> tuple[int, int, int, int]:
    """The FAT bits, the first FAT's offset in the image, one FAT's size and their count."""
    boot = image.read_bytes()[BOOT:BOOT + 512]
    sector, _, reserved, fats = struct.unpack_from("<HBHB", boot, 11)
    fat16 = struct.unpack_from("<H", boot, 22)[0]
    size = (fat16 or struct.unpack_from("<I", boot, 36)[0]) * sector
    return (16 if fat16 else 32), BOOT + reserved * sector, size, fats


@pytest.mark.parametrize("fat", [32, 16])
def test_a_fat_whose_second_entry_says_dirty_is_refused(
        tmp_path: Path, fat: int, loop_factory: Callable[..., Loop]) -> None:
    """The clean-shutdown bit of FAT[1] cleared (in every FAT): fsck.vfat -n says "Dirty bit
    is set" (exit 1) on every drive, after its whole write."""
    image = pi_image.build(tmp_path, fat=fat)
    bits, first, size, count = _fats(image)
    width, clean = (4, 0x08000000) if bits == 32 else (2, 0x8000)
    for n in range(count):
        at = first + n * size + width
        entry = int.from_bytes(image.read_bytes()[at:at + width], "little")
        _poke(image, at, (entry & ~clean).to_bytes(width, "little"))
    line = _refused(tmp_path, image, loop_factory)
    assert "fsck.vfat -n finds problems in its boot partition (Dirty bit is set" in line, line
    assert "run fsck.vfat -a" in line, line


def test_fats_that_differ_are_refused(tmp_path: Path,
                                      loop_factory: Callable[..., Loop]) -> None:
    """A cluster taken in the second FAT only: "FATs differ" (exit 1) on every drive."""
    image = pi_image.build(tmp_path)
    _, first, size, _ = _fats(image)
    _poke(image, first + size + 4 * 5000, struct.pack("<I", 0x0FFFFFFF))
    line = _refused(tmp_path, image, loop_factory)
    assert "finds problems in its boot partition (FATs differ" in line, line
