"""``erase`` of a drive that drops its writes behind a write cache (review of the reading and
erasing commands): each step's read-back was answered from the cache, so the drive was
reported erased while it held none of it."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_root, popsicle_cmd
from faulty import FaultyDrive

MiB = 1 << 20
PATTERN = 0xA5

pytestmark = needs_root


def erase_json(path: str, *args: str) -> tuple[int, dict[str, Any]]:
    result = subprocess.run([*popsicle_cmd(), "erase", path, "--yes", "--json", *args],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=120, check=False)
    summary = json.loads(result.stdout.splitlines()[-1])
    return result.returncode, dict(summary["results"][0])


@pytest.mark.parametrize("fs", ["fat32", "none"])
def test_a_drive_that_drops_writes_behind_a_cache_is_not_erased(
        faulty_drive: Callable[..., FaultyDrive], fs: str) -> None:
    """32 write requests (up to 16 MiB) held in a cache that answers reads, nothing stored:
    the capacity probe's flush stamps do not reach past it, nor did any read-back."""
    drive = faulty_drive(64 * MiB, fill=PATTERN, drop_writes_after=0, cache_writes=32)
    code, line = erase_json(drive.path, "--fs", fs)
    drive.clear()
    assert drive.read(0, 4096) == bytes([PATTERN]) * 4096  # nothing reached the store
    assert (code, line["status"], line["cause"]) == (1, "invalid", "mismatch")
    assert "does not read back as what was written before (it dropped writes a cache had " \
        "answered for: the drive is failing)" in line["error"]


def test_a_healthy_drive_is_still_erased(faulty_drive: Callable[..., FaultyDrive],
                                        tmp_path: Path) -> None:
    """A drive that stores its writes: ok, with its partition table and file system (the
    zeros written past a cache land in space the new file system leaves free)."""
    drive = faulty_drive(64 * MiB, fill=PATTERN)
    code, line = erase_json(drive.path, "--fs", "exfat")
    assert (code, line["status"]) == (0, "ok")
    assert drive.read(510, 2) == b"\x55\xaa"
    assert drive.read(MiB + 3, 8) == b"EXFAT   "
    part = tmp_path / "part.img"
    part.write_bytes(drive.read(MiB, 63 * MiB))
    check = subprocess.run(["fsck.exfat", "-n", str(part)], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, check.stdout


def test_ctrl_c_while_writing_past_the_cache_leaves_no_partition_table(
        faulty_drive: Callable[..., FaultyDrive]) -> None:
    """The zeros past the cache go before the table: a drive interrupted there has none."""
    drive = faulty_drive(64 * MiB, fill=PATTERN, crawl=(8 * MiB, 2 * MiB, 24 * MiB))
    erase = subprocess.Popen([*popsicle_cmd(), "erase", drive.path, "--yes", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not any(start >= 8 * MiB and length > 64 << 10  # not the probe's stamps
                      for start, length in drive.writes()):
            assert erase.poll() is None, erase.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        erase.send_signal(signal.SIGINT)
        out, err = erase.communicate(timeout=30)
    finally:
        if erase.poll() is None:
            erase.kill()
            erase.communicate()
    summary = json.loads(out.splitlines()[-1])
    assert (erase.returncode, summary["results"][0]["status"]) == (130, "cancelled"), err
    drive.clear()
    assert drive.read(510, 2) != b"\x55\xaa"
