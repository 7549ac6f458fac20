"""``erase --label`` words that FAT or exFAT reads as no label at all.

"NO NAME" is the label FAT writes for a volume without one: ``--label "no name"`` was made,
reported ok, and the stick had no label (``blkid`` reads none, nor does Windows).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest
from conftest import Loop, needs_root, popsicle_cmd

MiB = 1 << 20
PATTERN = 0x5A

pytestmark = needs_root


@pytest.mark.parametrize("label", ["no name", "NO NAME  "])
def test_a_fat_label_that_reads_as_none_is_refused(loop_factory: Callable[..., Loop],
                                                   label: str) -> None:
    drive = loop_factory(40 * MiB, fill=PATTERN)
    result = subprocess.run([*popsicle_cmd(), "erase", drive.path, "--yes", "--label", label],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"popsicle-py: --label {label!r}: \"NO NAME\" is what FAT calls a "
                             "volume without a label; choose another\n")
    assert drive.read() == bytes([PATTERN]) * drive.size


def test_an_exfat_label_of_spaces_alone_is_refused(loop_factory: Callable[..., Loop]) -> None:
    """mkfs.exfat made it and the run said ok; blkid then reads no LABEL at all."""
    drive = loop_factory(40 * MiB, fill=PATTERN)
    result = subprocess.run([*popsicle_cmd(), "erase", drive.path, "--yes", "--fs", "exfat",
                             "--label", "   "], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("popsicle-py: --label '   ': an exFAT label of spaces alone reads "
                             "as no label\n")
    assert drive.read() == bytes([PATTERN]) * drive.size
