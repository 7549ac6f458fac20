"""A drive that stops answering right after mcopy wrote its boot files: mcopy's writes are in
the page cache, and their flush (and the process's exit, which waits for it uninterruptibly)
cannot end before the kernel gives the drive up.  The drive fails as stalled with the summary on
time, and, as for a hung write of the engine's own, a note says that a call has not returned and
that popsicle-py exits once it does: the old code said nothing and simply did not exit.

The stick is a FUSE-backed loop device (tests/faulty.py); the ``mcopy`` stand-in first on PATH
runs the real one, then stops the FUSE daemon (SIGSTOP): every later request to the drive waits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pi_image
from conftest import events_until_summary, needs_root, popsicle_cmd
from faulty import FaultyDrive

pytestmark = needs_root
FILL = 0x5A


def test_a_drive_that_hangs_after_its_boot_files_says_why_the_process_waits(
        tmp_path: Path, faulty_drive: Callable[..., FaultyDrive]) -> None:
    image = pi_image.build(tmp_path, table="mbr")
    toml = tmp_path / "settings.toml"
    toml.write_text('hostname = "pi-01"\n')
    drive = faulty_drive(image.stat().st_size, fill=FILL)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mcopy").write_text("#!/bin/sh\n/usr/bin/mcopy \"$@\"; done=$?\n"
                                f"kill -STOP {drive.pid}\nexit $done\n")
    (fake / "mcopy").chmod(0o755)
    proc = subprocess.Popen([*popsicle_cmd(), "flash", str(image), drive.path, "--yes", "--json",
                             "--stall-timeout", "2", "--customize", str(toml)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    try:
        events, _ = events_until_summary(proc, time.monotonic() + 60)
    finally:
        os.kill(drive.pid, signal.SIGCONT)  # the flush returns, and the process can exit
        proc.communicate(timeout=60)
    (result,) = events[-1]["results"]
    assert result["status"] == "failed" and "stalled" in result["error"], result
    notes = [e["text"] for e in events if e["event"] == "note"]
    assert any(n.startswith(f"{drive.path}: a read or write to this drive has not returned; "
                            "popsicle-py exits once it does") for n in notes), notes
