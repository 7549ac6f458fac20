"""What the boot-files step proves on the device, beyond the files it wrote: a write that also
renames another file of the root directory, makes it hidden, changes the sectors before the FAT
(FAT32's backup boot sector) or the last cluster of the file next to the new ones (in the same
4 KiB block: 512-byte clusters, a data region not 4 KiB aligned) fails the drive, its head
unwritten.  Each of these changes only bytes the block comparison allows (the root directory;
the 4 KiB block that holds FSInfo; a block that holds a new file's cluster), moves no cluster in
the FAT, and ``fsck.vfat -n`` finds nothing in them (the backup: "mostly harmless", exit 0): the
old code reported the drive ok with its config.txt gone, or its start4.elf spoilt.

An ``mcopy`` stand-in first on PATH runs the real one, then does the damage (a stand-in for a
writer or a drive that gets a sector of the directory or the reserved area wrong).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pi_image
import pytest
from conftest import Loop, popsicle_cmd
from test_customize import FILL, inputs, mtype, summary_of

from popsicle_py.settings.fat import geometry, read_fat, root_files

pytestmark = pytest.mark.root
BOOT = 4 << 20  # where pi_image puts the boot partition

#: After the real mcopy: the damage, given the drive as "$2" (mcopy's -i argument).
DAMAGE = {
    "renamed": ('/usr/bin/mren -i "$2" ::/config.txt ::/cfg.txt',
                "directory entry of config.txt, a file not written, changed or is gone"),
    "hidden": ('/usr/bin/mattrib -i "$2" +h ::/config.txt',
               "directory entry of config.txt, a file not written, changed or is gone"),
    "next file": ("printf X | dd of=\"${2%@@*}\" bs=1 seek={start4_end} conv=notrunc "
                  "status=none", "changed outside the files written (cluster"),
    "backup boot sector": (
        "printf XXXX | dd of=\"${2%@@*}\" bs=1 seek=$((" + str(BOOT) + " + 6 * 512 + 3)) "
        "conv=notrunc status=none", "reserved sector 6"),
}


def start4_end(image: Path) -> int:
    """The device offset of the last byte of start4.elf, the last file before the free
    clusters the new files take."""
    data = image.read_bytes()

    def read(offset: int, length: int) -> bytes:
        return data[BOOT + offset:BOOT + offset + length]

    geo = geometry(read(0, 512))
    fat = read_fat(geo, read(geo.reserved, geo.fat_size))
    (_, clusters), = root_files(geo, fat, read, {"start4.elf"}).values()
    return BOOT + geo.cluster_offset(clusters[-1]) + geo.cluster - 1


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_write_that_also_changes_what_it_did_not_write_fails_the_drive(
        tmp_path: Path, loop_factory: Callable[..., Loop], damage: str) -> None:
    command, said = DAMAGE[damage]
    image = pi_image.build(tmp_path, table="mbr")
    command = command.replace("{start4_end}", str(start4_end(image)))
    original = image.read_bytes()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mcopy").write_text("#!/bin/sh\n/usr/bin/mcopy \"$@\" || exit\n"
                                "while [ \"$1\" != -i ]; do shift; done\n"
                                f"MTOOLS_SKIP_CHECK=1 {command} 2>/dev/null\n")
    (fake / "mcopy").chmod(0o755)
    toml, values = inputs(tmp_path)
    loop = loop_factory(len(original), fill=FILL)
    done = subprocess.run([*popsicle_cmd(), "flash", str(image), loop.path, "--yes", "--json",
                           "--customize", str(toml), "--values", str(values)],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    assert done.returncode == 1, done.stderr + done.stdout
    (result,) = summary_of(done.stdout)["results"]
    assert result["status"] == "failed" and result["customized"] is None, result
    assert said in result["error"], result["error"]
    head = Path(loop.backing).read_bytes()[:64 << 10]
    assert head != original[:64 << 10] and head != bytes([FILL]) * len(head)  # the stamp


def test_a_clean_write_keeps_every_other_entry_and_passes(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    """The same checks pass a write that changes nothing else (the image's cmdline.txt
    replaced, the others read back as they were), on FAT12 too."""
    image = pi_image.build(tmp_path, table="mbr", fat=12, boot_mib=8)
    toml, values = inputs(tmp_path)
    loop = loop_factory(image.stat().st_size, fill=FILL)
    done = subprocess.run([*popsicle_cmd(), "flash", str(image), loop.path, "--yes", "--json",
                           "--customize", str(toml), "--values", str(values)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr + done.stdout
    assert mtype(loop, BOOT, "config.txt") == pi_image.CONFIG
    assert b"systemd.run=" in mtype(loop, BOOT, "cmdline.txt")
