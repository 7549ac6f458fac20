"""--customize on a slow stick: the boot files' writes are progress the stall clock sees.

mcopy writes through the page cache and the step's flush pushes it to the drive: neither is
a byte the step moves itself, so a stick that takes longer than the stall timeout to take
[files] was failed as "stalled" while it wrote at its own steady speed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pi_image
from faulty import FaultyDrive
from test_customize import SETTINGS, inputs, mtype, popsicle, summary_of

MiB = 1 << 20
BOOT = 4 * MiB  # where pi_image puts the boot partition (40 MiB of FAT32)


def test_a_slow_stick_taking_large_boot_files_is_not_stalled(
        tmp_path: Path, faulty_drive: Callable[..., FaultyDrive]) -> None:
    """About 6 MiB of [files] land where the drive crawls at 4 MiB/s, under a 2 s stall
    timeout: mcopy's writes (its 512-byte clusters make the page cache read each page first)
    and their flush take three seconds, progressing all along.  The image itself is trimmed
    to what its file systems use, so only the boot files land there."""
    image = pi_image.build(tmp_path, table="mbr")
    payload = os.urandom(10 * MiB)
    (tmp_path / "payload.bin").write_bytes(payload)
    toml, values = inputs(tmp_path, SETTINGS + '[files]\n"payload.bin" = "payload.bin"\n')
    drive = faulty_drive(64 * MiB, crawl=(BOOT + 6 * MiB, 4 * MiB, BOOT + 40 * MiB))
    done = popsicle("flash", image, drive.path, "--yes", "--json", "--no-probe",
                    "--customize", toml, "--values", values, "--stall-timeout", "2")
    assert done.returncode == 0, done.stderr + done.stdout[-400:]
    [result] = summary_of(done.stdout)["results"]
    assert result["status"] == "ok", result
    assert mtype(drive, BOOT, "payload.bin") == payload  # type: ignore[arg-type]
