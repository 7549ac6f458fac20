"""A second Ctrl-C quits at once, but not with part of the image's head left on a drive.

The first Ctrl-C stops a drive inside its head's write, and its lane puts the stamp back;
a user who presses Ctrl-C again (the stamp's write takes a moment on a slow stick) used to
end the process before that write, leaving the image's head from its end back to where it
got (UDF anchors, btrfs's superblock, ISO 9660 descriptors): the drive could be taken for
the image."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from conftest import needs_root, popsicle_cmd
from faulty import FaultyDrive, MiB

pytestmark = needs_root

IMAGE = 8 * MiB
HEAD = MiB
BLOCK = 4096


def test_a_second_ctrl_c_inside_the_head_still_puts_the_stamp_back(
        tmp_path: Path, faulty_drive: Callable[..., FaultyDrive]) -> None:
    content = os.urandom(IMAGE)
    image = tmp_path / "image.img"
    image.write_bytes(content)
    # The head's place at 1 MB/s: its write takes about a second, as does the stamp's.
    drive = faulty_drive(32 * MiB, fill=0x5A, crawl=(0, 1_000_000, HEAD))
    proc = subprocess.Popen(
        [*popsicle_cmd(), "flash", str(image), drive.path, "--yes", "--json", "--no-probe",
         "--no-checksum"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if '"phase": "syncing"' in line:  # the head's write begins
                break
        head_began = drive.writes()
        deadline = time.monotonic() + 30
        while drive.writes() == head_began and time.monotonic() < deadline:
            time.sleep(0.02)  # the head's first call reached the drive
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        quit_at = time.monotonic()
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - quit_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert took < 5, took  # still promptly
    drive.clear()
    held = drive.read(0, HEAD)
    kept = [offset for offset in range(0, HEAD, BLOCK)
            if held[offset : offset + BLOCK] == content[offset : offset + BLOCK]]
    assert kept == [], f"{len(kept)} blocks of the image's head left, from byte {kept[:1]}"
