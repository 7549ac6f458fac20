"""A FAT32 boot sector's FSInfo field, as a damaged or hostile image may give it: the check of
what the per-drive write changed allows FSInfo's 4 KiB block, so that block must be FSInfo's.

0 and 0xFFFF mean "no FSInfo" (as mtools reads them; 0xFFFF was read as sector 65535, 32 MiB
into the partition); a sector outside the reserved ones is refused.  ``fsck.vfat -n``, which
runs on the image before any write, refuses most such images too, for a missing FSInfo
signature; an image with one where the field points stays for the check to catch.
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pi_image
import pytest
from conftest import Loop, popsicle_cmd
from test_customize import FILL, inputs

from popsicle_py.settings.fat import FatError, geometry

BOOT = 4 << 20  # where pi_image puts the boot partition


def boot_sector(tmp_path: Path, fsinfo: int) -> tuple[Path, bytes]:
    image = pi_image.build(tmp_path, table="mbr")
    with open(image, "r+b") as f:
        for sector in (0, 6):  # and its backup, where mkfs.vfat puts it
            f.seek(BOOT + sector * 512 + 48)
            f.write(struct.pack("<H", fsinfo))
        f.seek(BOOT)
        return image, f.read(512)


@pytest.mark.parametrize("field", [0, 0xFFFF])
def test_fsinfo_0_and_0xffff_are_no_fsinfo(tmp_path: Path, field: int) -> None:
    _, boot = boot_sector(tmp_path, field)
    assert geometry(boot).fsinfo is None


def test_fsinfo_in_the_reserved_sectors_is_where_it_says(tmp_path: Path) -> None:
    _, boot = boot_sector(tmp_path, 1)
    assert geometry(boot).fsinfo == 512


@pytest.mark.root
def test_fsinfo_outside_the_reserved_sectors_is_refused_before_anything_is_written(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    image, boot = boot_sector(tmp_path, 0x4000)
    with pytest.raises(FatError):
        geometry(boot)
    loop = loop_factory(image.stat().st_size, fill=FILL)
    toml, values = inputs(tmp_path)
    done = subprocess.run([*popsicle_cmd(), "flash", str(image), loop.path, "--yes",
                           "--customize", str(toml), "--values", str(values)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr + done.stdout
    assert done.stderr.splitlines() == [
        "popsicle-py: cannot customise this image: the boot partition's FAT32 boot sector "
        "puts FSInfo at sector 16384, outside its 32 reserved sectors (a damaged image?)"]
    assert Path(loop.backing).read_bytes() == bytes([FILL]) * loop.size
