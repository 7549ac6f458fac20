"""read, erase and check when their terminal goes away: a hang-up (129), as for flash.

The terminal can be gone with no SIGHUP handled first (``nohup``, or the write came first):
the next write to it fails with EIO.  flash and verify take that as the hang-up it is; read,
erase and check let the EIO escape the view: "unexpected error: [Errno 5] Input/output error",
exit 1, where the man page promises 129 with the drives closed.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import select
import signal
import subprocess
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import popsicle_cmd

MiB = 1 << 20

pytestmark = pytest.mark.root


@pytest.mark.parametrize("command", ["read", "erase", "check"])
def test_a_terminal_gone_without_sighup_exits_129(command: str, tmp_path: Path,
                                                  faulty_drive: Callable[..., Any]) -> None:
    drive = faulty_drive(32 * MiB, fill=0, crawl=(0, MiB))  # about 30 s to read or erase
    args = {"read": ["read", drive.path, str(tmp_path / "copy.img")],
            "erase": ["erase", "--yes", "--zero", drive.path],
            "check": ["check", "--sha256", hashlib.sha256(bytes(8 * MiB)).hexdigest(),
                      "--size", str(8 * MiB), drive.path]}[command]
    master, slave = os.openpty()
    errors = tmp_path / "stderr"

    def child() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup: only the EIO tells

    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    with errors.open("wb") as stderr:
        proc = subprocess.Popen([*popsicle_cmd(), *args], stdin=slave, stdout=slave,
                                stderr=stderr, preexec_fn=child, env=env)
    os.close(slave)
    try:
        seen = bytearray()
        deadline = time.monotonic() + 30
        while seen.count(b"%") < 3:  # its rows are showing progress
            assert time.monotonic() < deadline and proc.poll() is None, bytes(seen)
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                seen += os.read(master, 65536)
    finally:
        os.close(master)  # the terminal hangs up
    try:
        status = proc.wait(timeout=20)
    finally:
        drive.clear()  # no more crawling, whatever happened
    assert status == 129, errors.read_text()
    assert "unexpected error" not in errors.read_text()
    assert not (tmp_path / "copy.img").exists()
