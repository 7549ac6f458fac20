"""Ctrl-C during ``popsicle-py probe``: the drive is cancelled, not failed (review, session 16).

Before: the probe, stopped between two of its requests, ended "failed: probe failed: probe
stopped at offset N" with cause ``io-error``, as if the stick were failing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable

from conftest import needs_root, popsicle_cmd
from faulty import FaultyDrive, MiB


@needs_root
def test_ctrl_c_during_a_probe_cancels_the_drive_and_exits_130(
        faulty_drive: Callable[..., FaultyDrive]) -> None:
    drive = faulty_drive(64 * MiB, crawl=(0, 100_000))  # 64 KiB requests: 0.65 s each
    proc = subprocess.Popen([*popsicle_cmd(), "probe", drive.path, "--yes", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(drive.writes()) < 3 and time.monotonic() < deadline:  # well into it
            time.sleep(0.05)
        assert len(drive.writes()) >= 3
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out + err
    (result,) = json.loads(out.splitlines()[-1])["results"]
    assert (result["status"], result["cause"]) == ("cancelled", "cancelled"), result
    assert "I/O error" not in out + err


@needs_root
def test_ctrl_c_during_a_probe_puts_back_what_its_stamps_overwrote(
        faulty_drive: Callable[..., FaultyDrive]) -> None:
    """Before: a probe stopped by the signal put nothing back (its stamps, and the stamps
    over the first MiB, stayed on a drive that still answered)."""
    drive = faulty_drive(64 * MiB, fill=0x5A, crawl=(0, 1_000_000))
    proc = subprocess.Popen([*popsicle_cmd(), "probe", drive.path, "--yes"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(drive.writes()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(drive.writes()) >= 3
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out + err
    assert drive.read(0, 64 * MiB) == bytes([0x5A]) * (64 * MiB)
