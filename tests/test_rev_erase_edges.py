"""``erase`` of a drive past the MBR's reach (a sparse 3 TiB loop device).

An MBR addresses 2**32 sectors: on a 3 TiB drive the one partition covers its first 2 TiB
and the rest is left unused, which nothing said ("one exFAT partition", then a 2 TiB stick).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable

import pytest
from conftest import Loop, needs_root, popsicle_cmd

from popsicle_py import erase

MiB = 1 << 20
TiB = 1 << 40

pytestmark = [needs_root,
              pytest.mark.skipif(shutil.which("mkfs.exfat") is None, reason="needs exfatprogs")]


def test_a_drive_past_2_tib_is_told_its_partition_covers_only_the_first_2_tib(
        loop_factory: Callable[..., Loop]) -> None:
    drive = loop_factory(3 * TiB)
    result = subprocess.run([*popsicle_cmd(), "erase", drive.path, "--yes", "--json"],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    notes = [e["text"] for e in map(json.loads, result.stdout.splitlines())
             if e["event"] == "note"]
    assert notes[0] == (f"{drive.path}: one exFAT partition over its first 2 TiB (the most an "
                        "MBR addresses)"), notes
    table = json.loads(subprocess.run(["sfdisk", "--json", drive.path], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    [part] = table["partitions"]
    assert (part["start"] + part["size"]) * 512 <= 2 * TiB + MiB


def test_what_the_note_says_at_the_edges() -> None:
    assert erase.made(64 * MiB, "fat32") == "one FAT32 partition"
    assert erase.made(2 * TiB, "exfat") == "one exFAT partition"
    assert erase.made(2 * TiB + 2 * MiB, "exfat") == (
        "one exFAT partition over its first 2 TiB (the most an MBR addresses)")
    assert erase.made(20 * TiB, "fat32", 4096) == (
        "one FAT32 partition over its first 16 TiB (the most an MBR addresses)")
