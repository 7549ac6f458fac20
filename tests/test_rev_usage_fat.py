"""A FAT volume marked dirty (not cleanly unmounted) is written whole: its FAT may not yet hold
the clusters its files use, which trim would otherwise leave as the drive had them."""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, needs_root, popsicle_cmd

from tests.fs_images import MiB, garbage, make_fat, needs_fs_tools, run, tree, usage_of

pytestmark = needs_fs_tools

MTOOLS = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def _geometry(image: Path) -> tuple[int, int, int, int, bool]:
    """(sector, sectors per cluster, first FAT's sector, sectors per FAT, FAT32)."""
    boot = image.read_bytes()[:512]
    ss, spc, reserved, _fats = struct.unpack_from("<HBHB", boot, 11)
    fat16, = struct.unpack_from("<H", boot, 22)
    fat_sectors = fat16 or struct.unpack_from("<I", boot, 36)[0]
    return ss, spc, reserved, fat_sectors, fat16 == 0


def _mark(image: Path, how: str) -> None:
    """Mark the volume dirty: Linux's state flag, or Windows' clean bit in FAT entry 1."""
    ss, _, reserved, fat_sectors, fat32 = _geometry(image)
    with open(image, "r+b") as f:
        if how == "state":
            f.seek(0x41 if fat32 else 0x25)
            f.write(b"\x01")
            return
        for copy in range(2):
            at = (reserved + copy * fat_sectors) * ss + (4 if fat32 else 2)
            f.seek(at)
            entry = f.read(4 if fat32 else 2)
            value = int.from_bytes(entry, "little") & ~(0x08000000 if fat32 else 0x8000)
            f.seek(at)
            f.write(value.to_bytes(len(entry), "little"))


@pytest.mark.parametrize("bits", ["16", "32"])
@pytest.mark.parametrize("how", ["state", "fat1"])
def test_a_dirty_fat_volume_is_written_whole(tmp_path: Path, bits: str, how: str) -> None:
    image = tmp_path / "fat.img"
    garbage(image, 40 * MiB)
    tree(tmp_path / "keep")
    make_fat(image, 0, 40 * MiB, tmp_path / "keep", ["-F", bits])
    clean = usage_of(image)
    assert clean.notes == () and clean.skipped > 20 * MiB
    _mark(image, how)
    usage = usage_of(image)
    assert usage.ranges == ((0, 40 * MiB),)
    assert usage.notes == ("the image: it was not cleanly unmounted (marked dirty; fsck.fat "
                           "has not repaired it): written whole",)


def _dirty_image(tmp_path: Path) -> tuple[Path, int, bytes]:
    """A FAT32 volume left as a pulled-out stick can be: a file's data and its directory entry
    written, its cluster's FAT entry not yet, the volume marked dirty.  (image, the file's
    offset, its bytes)."""
    image = tmp_path / "stick.img"
    garbage(image, 64 * MiB)
    run("mkfs.vfat", "-F", "32", "-s", "1", str(image), str(64 * MiB // 1024))
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    big.write_bytes(bytes(6 * MiB))
    data = os.urandom(3000)
    small.write_bytes(data)
    for args in (["mcopy", "-i", str(image), str(big), "::big.bin"],
                 ["mcopy", "-i", str(image), str(small), "::small.bin"],
                 ["mdel", "-i", str(image), "::big.bin"]):
        run(*args, env=MTOOLS)
    ss, spc, reserved, fat_sectors, _ = _geometry(image)
    raw = bytearray(image.read_bytes())
    data_at = (reserved + 2 * fat_sectors) * ss
    entry = raw.find(b"SMALL   BIN", data_at, data_at + spc * ss)
    cluster = (struct.unpack_from("<H", raw, entry + 26)[0]
               | struct.unpack_from("<H", raw, entry + 20)[0] << 16)
    chain = [cluster]
    while (after := struct.unpack_from("<I", raw, reserved * ss + chain[-1] * 4)[0]
           & 0x0FFFFFFF) < 0x0FFFFFF8:
        chain.append(after)
    for copy in range(2):
        for one in chain:
            struct.pack_into("<I", raw, (reserved + copy * fat_sectors) * ss + one * 4, 0)
    raw[0x41] |= 1
    image.write_bytes(raw)
    offset = data_at + (cluster - 2) * spc * ss
    assert raw[offset : offset + len(data)] == data
    return image, offset, data


@needs_root
def test_a_dirty_volume_s_file_reaches_the_drive(loop_factory: Callable[..., Loop],
                                                 tmp_path: Path) -> None:
    image, offset, data = _dirty_image(tmp_path)
    drive = loop_factory(64 * MiB, fill=0x5A)
    proc = subprocess.run([*popsicle_cmd(), "flash", str(image), drive.path, "--yes",
                           "--no-probe"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert drive.read(len(data), offset) == data  # the file, not the drive's old bytes
    assert "not cleanly unmounted" in proc.stdout + proc.stderr
    assert drive.read(64 * MiB) == image.read_bytes()
