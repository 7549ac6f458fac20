"""``erase`` of a drive with 4096-byte logical sectors (a "4Kn" USB disk; ``losetup -b 4096``).

The MBR counts in the drive's sectors: written in 512-byte units, its one partition started
at 8 MiB instead of 1 MiB, and ran 8 times past the drive's end; and the FAT made with
512-byte sectors is one the kernel's vfat refuses to mount on such a drive ("logical sector
size too small for device").  The run said ok.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_root, popsicle_cmd
from loopdev import Loop, detach

from popsicle_py import erase

MiB = 1 << 20
PATTERN = 0x5A

pytestmark = needs_root


@contextlib.contextmanager
def loop_4k(size: int, *, offset: int = 0, read_only: bool = False,
            backing: Path | None = None) -> Iterator[Loop]:
    """A loop device with 4096-byte logical sectors over a new sparse file (its first 4 MiB
    filled with a pattern: old bytes) or, with ``backing``, over that file at ``offset``."""
    made = backing is None
    path = backing or Path("/dev/shm") / f"popsicle-test-{uuid.uuid4().hex[:8]}.img"
    if made:
        with open(path, "wb") as f:
            f.write(bytes([PATTERN]) * 4 * MiB)
            f.truncate(size)
    loop = subprocess.run(["losetup", "-f", "--show", "-b", "4096", "-o", str(offset),
                           *(["-r"] if read_only else []), str(path)],
                          capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield Loop(loop, path, size)
    finally:
        detach(loop, path)
        if made:
            path.unlink()


def erase_run(drive: Loop, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), "erase", drive.path, "--yes", "--json", *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=120, check=False)


def test_a_4096_byte_sector_drive_gets_a_table_and_a_fat32_in_its_sectors() -> None:
    with loop_4k(300 * MiB) as drive:
        assert Path(f"/sys/block/{drive.name}/queue/logical_block_size").read_text() == "4096\n"
        result = erase_run(drive, "--label", "FOURK")
        assert result.returncode == 0, result.stderr
        notes = [json.loads(line)["text"] for line in result.stdout.splitlines()
                 if json.loads(line)["event"] == "note"]
        assert f"{drive.path}: one FAT32 partition" in notes, notes
        table = json.loads(subprocess.run(["sfdisk", "--json", drive.path], capture_output=True,
                                          text=True, check=True).stdout)["partitiontable"]
        assert table["sectorsize"] == 4096
        [part] = table["partitions"]
        assert (part["start"], part["size"], part["type"]) == (
            MiB // 4096, (300 * MiB - MiB) // 4096, "c")
        with loop_4k(300 * MiB, offset=MiB, read_only=True, backing=drive.backing) as volume:
            found = subprocess.run(["blkid", "-p", "-o", "export", volume.path],
                                   capture_output=True, text=True).stdout
            assert "TYPE=vfat" in found and "VERSION=FAT32" in found and "LABEL=FOURK" in found
            # The volume's sector is the drive's: the kernel's vfat refuses a smaller one
            # ("logical sector size too small for device"), and so does Windows.
            assert "BLOCK_SIZE=4096" in found, found
            fsck = subprocess.run(["fsck.vfat", "-n", volume.path], capture_output=True,
                                  text=True)
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        mdir = subprocess.run(["mdir", "-i", f"{drive.backing}@@1M"], capture_output=True,
                              text=True)
        assert "Volume in drive : is FOURK" in mdir.stdout, mdir


@pytest.mark.parametrize(("size", "instead"), [(300 * MiB, "FAT32"), (64 * MiB, "FAT12")])
def test_exfat_with_512_byte_sectors_is_refused_on_a_4096_byte_sector_drive(
        size: int, instead: str) -> None:
    """mkfs.exfat (exfatprogs 1.2) makes 512-byte sectors in the file it works on: asked for
    by name on such a drive, it is a refusal, nothing written."""
    with loop_4k(size) as drive:
        before = drive.read(8 * MiB)
        result = erase_run(drive, "--fs", "exfat")
        assert result.returncode == 2, result.stderr
        assert result.stderr == (
            f"popsicle-py: {drive.path} has 4096-byte sectors, and mkfs.exfat makes exFAT "
            f"with 512-byte ones only (in the file it is made in): leave out --fs to make "
            f"{instead}\n")
        assert drive.read(8 * MiB) == before


def test_the_rules_count_in_the_drives_sectors() -> None:
    big = 64 << 30
    assert (erase.default_fs(big), erase.default_fs(big, 4096)) == ("exfat", "fat32")
    part = erase.layout(300 * MiB, "fat32", 4096)
    assert (part.start, part.length, part.fat_bits, part.sector) == (MiB, 299 * MiB, 32, 4096)
    sector = erase.mbr(part, b"\x01\x02\x03\x04")
    assert int.from_bytes(sector[454:458], "little") == MiB // 4096
    assert int.from_bytes(sector[458:462], "little") == 299 * MiB // 4096
    huge = erase.layout(20 << 40, "fat32", 4096)  # an MBR of 4096-byte sectors: 16 TiB
    assert huge.length // 4096 <= erase.MBR_MAX_SECTORS
    assert erase.made(64 * MiB, "fat32", 4096).endswith("(too small for FAT32)")
    assert erase.no_fat32("/dev/sdx", 64 * MiB, 4096) is not None
    assert erase.no_fat32("/dev/sdx", 64 * MiB) is None
