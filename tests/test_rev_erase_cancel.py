"""Ctrl-C during ``erase``: the result says what the stick was left holding.

It said "cancelled" whatever the drive held: one untouched (the file system was still being
made) and one whose partition table and signatures were already gone read the same, and
nothing told the user that the second needs erasing again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from conftest import needs_root, popsicle_cmd
from faulty import FaultyDrive
from loopdev import write_mbr

from popsicle_py.events import DriveResult, Status
from popsicle_py.verdicts import result_line

MiB = 1 << 20
PATTERN = 0x5A

pytestmark = needs_root


def interrupted(proc: subprocess.Popen[str], ready: Callable[[], bool],
                group: bool = False) -> tuple[dict[str, object], float]:
    """SIGINT once ``ready()``; the one result, and the seconds from the signal to the exit."""
    try:
        deadline = time.monotonic() + 30
        while not ready():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)  # polling the drive's write log: no event says a write began
        sent = time.monotonic()
        if group:
            os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the whole group
        else:
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    [result] = json.loads(out.splitlines()[-1])["results"]
    return dict(result), took


def test_ctrl_c_while_wiping_says_the_drive_is_partly_wiped(
        faulty_drive: Callable[..., FaultyDrive]) -> None:
    drive = faulty_drive(64 * MiB, fill=PATTERN)
    write_mbr(drive.file, [(2048, 100000)])
    drive.set(crawl=[63 * MiB, 512 << 10])  # the last MiB, wiped after the first, crawls
    proc = subprocess.Popen([*popsicle_cmd(), "erase", drive.path, "--yes", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    result, took = interrupted(proc, lambda: any(
        start >= 63 * MiB and length > 64 << 10 for start, length in drive.writes()))
    assert (result["status"], result["cause"]) == ("cancelled", "cancelled"), result
    assert result["error"] == ("cancelled while wiping: the drive is partly wiped (its old "
                               "partition table may be gone); erase it again")
    assert took < 10, took
    drive.clear()
    assert drive.read(510, 2) != b"\x55\xaa"  # as it says: the old table is gone


def test_ctrl_c_before_wiping_says_the_drive_is_as_it_was(
        faulty_drive: Callable[..., FaultyDrive], tmp_path: Path) -> None:
    """Cancelled while mkfs runs, before any drive is touched."""
    drive = faulty_drive(64 * MiB, fill=PATTERN)
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "mkfs.vfat").write_text(
        f"#!/bin/sh\nsleep 30\nexec {shutil.which('mkfs.vfat')} \"$@\"\n")
    (folder / "mkfs.vfat").chmod(0o755)
    proc = subprocess.Popen([*popsicle_cmd(), "erase", drive.path, "--yes", "--json", "--fs",
                             "fat32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"})
    result, took = interrupted(proc, lambda: subprocess.run(
        ["pgrep", "-f", str(folder)], capture_output=True).returncode == 0, group=True)
    assert (result["status"], result["error"]) == (
        "cancelled", "cancelled before wiping began: the drive still holds what it held")
    assert took < 10, took
    assert drive.read(0, 4 * MiB) == bytes([PATTERN]) * 4 * MiB


def test_ctrl_c_while_probing_puts_the_probes_stamps_back(
        faulty_drive: Callable[..., FaultyDrive]) -> None:
    """The probe's stamps were left on a drive the user had just told to stop (``probe``
    itself puts them back after a Ctrl-C): 32 blocks of it overwritten, "cancelled"."""
    drive = faulty_drive(64 * MiB, fill=PATTERN, crawl=(0, 256 << 10))
    proc = subprocess.Popen([*popsicle_cmd(), "erase", drive.path, "--yes", "--json", "--fs",
                             "none"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    result, took = interrupted(proc, lambda: len(drive.writes()) >= 3)  # stamps, crawling
    assert (result["status"], result["error"]) == (
        "cancelled", "cancelled while its capacity was probed: the blocks the probe wrote "
        "were put back, unless the drive had stopped answering")
    assert took < 10, took
    drive.clear()
    assert drive.read(0, 64 * MiB) == bytes([PATTERN]) * 64 * MiB


def test_the_line_says_cancelled_once() -> None:
    """A result that starts with its status is not said after it again ("cancelled:
    cancelled while wiping: ..."), flash's "cancelled; the image's ..." neither."""
    for error in ("cancelled while wiping: erase it again",
                  "cancelled; the image's first 1 MiB were overwritten again"):
        result = DriveResult("/dev/sdx", Status.CANCELLED, 0, error)
        assert result_line(result) == f"/dev/sdx: {error}"
    assert result_line(DriveResult("/dev/sdx", Status.CANCELLED, 0, "cancelled")) == (
        "/dev/sdx: cancelled")
    assert result_line(DriveResult("/dev/sdx", Status.FAILED, 0, "/dev/sdx: stalled")) == (
        "/dev/sdx: failed: stalled")
