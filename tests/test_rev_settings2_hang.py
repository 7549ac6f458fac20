"""A drive that stops answering right after mcopy wrote its boot files: mcopy's writes are in
the page cache, and their flush (and the process's exit, which waits for it uninterruptibly)
cannot end before the kernel gives the drive up.  The drive fails as stalled with the summary on
time, and, as for a hung write of the engine's own, a note says that a call has not returned and
that popsicle-py exits once it does: the old code said nothing and simply did not exit.

The stick is a FUSE-backed loop device (tests/faulty.py); the ``mcopy`` stand-in first on PATH
runs the real one, then makes every later request to the drive crawl at a byte a second (its
fault file replaced, as ``FaultyDrive.set`` does).  Not SIGSTOP of the daemon: its file's
every stat would wait too, and the flashes of the tests beside this one, which look at each
loop device's backing file, would wait their stall timeout for it.

While the flush hangs, a ``sync`` of another program's (sfdisk's, in a test beside this one)
waits for the drive's writeback holding its disk's open mutex, which the last close of the
drive takes: that close held the summary until the kernel gave the drive up.  Drives are now
closed on a thread of their own, waited for two seconds at most.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pi_image
import pytest
from conftest import events_until_summary, needs_root, popsicle_cmd
from faulty import FaultyDrive

pytestmark = needs_root
FILL = 0x5A


@pytest.mark.parametrize("sync", [False, True], ids=["alone", "with a sync beside"])
def test_a_drive_that_hangs_after_its_boot_files_says_why_the_process_waits(
        sync: bool, tmp_path: Path, faulty_drive: Callable[..., FaultyDrive]) -> None:
    image = pi_image.build(tmp_path, table="mbr")
    toml = tmp_path / "settings.toml"
    toml.write_text('hostname = "pi-01"\n')
    drive = faulty_drive(image.stat().st_size, fill=FILL)
    fake = tmp_path / "bin"
    fake.mkdir()
    crawl = tmp_path / "crawl.json"
    crawl.write_text(json.dumps({"crawl": [0, 1]}))
    (fake / "mcopy").write_text("#!/bin/sh\n/usr/bin/mcopy \"$@\"; done=$?\n"
                                f"cp {crawl} {drive.control}.new\n"
                                f"mv {drive.control}.new {drive.control}\n"
                                # anyone's sync: it waits, holding the drive's disk
                                f"{'sync &' if sync else ''}\nexit $done\n")
    (fake / "mcopy").chmod(0o755)
    proc = subprocess.Popen([*popsicle_cmd(), "flash", str(image), drive.path, "--yes", "--json",
                             "--stall-timeout", "2", "--customize", str(toml)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    try:
        events, _ = events_until_summary(proc, time.monotonic() + 30)
    finally:
        drive.clear()  # the flush returns, and the process can exit
        proc.communicate(timeout=60)
    (result,) = events[-1]["results"]
    assert result["status"] == "failed" and "stalled" in result["error"], result
    if sync:  # the summary came on time: what the sync made hang is the kernel's to say
        return
    notes = [e["text"] for e in events if e["event"] == "note"]
    assert any(n.startswith(f"{drive.path}: a read or write to this drive has not returned; "
                            "popsicle-py exits once it does") for n in notes), notes
