"""A terminal that goes away: SIGHUP stops the run (129); a run that takes no SIGHUP goes on.

A foreground run hears the hang-up as SIGHUP (the kernel's, or its shell's), and stops: 129,
the drives closed (tests/test_head_undone.py).  A run started under ``nohup`` (SIGHUP
ignored), or detached from the terminal (``setsid``, ``disown``: the terminal is not its
controlling one), was told to outlive it: the writes to the vanished terminal fail with EIO,
and only the output is lost.  Before, ``nohup`` was undone (our handler replaced the ignored
SIGHUP: a station ended at logout), and an EIO of the live rows' refresh went unseen or ended
in "unexpected error".
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


def _until_shown(master: int, proc: subprocess.Popen[bytes], enough: Callable[[bytes], bool],
                 out: Path | None = None) -> None:
    """Read the terminal (or ``out``, where nohup put the output) until ``enough``."""
    seen = bytearray()
    deadline = time.monotonic() + 30
    while not enough(bytes(seen) if out is None else
                     out.read_bytes() if out.exists() else b""):
        assert time.monotonic() < deadline and proc.poll() is None, bytes(seen)
        # nohup leaves the terminal to nobody: the end of its writer, at once (EIO)
        ready, _, _ = select.select([master] if out is None else [], [], [], 0.1)
        if ready:
            seen += os.read(master, 65536)


@pytest.mark.parametrize("command, term", [("read", "xterm-256color"),
                                           ("erase", "xterm-256color"),
                                           ("check", "xterm-256color"),
                                           ("read", "dumb")])
def test_a_run_the_terminal_left_without_sighup_goes_on(
        command: str, term: str, tmp_path: Path,
        faulty_drive: Callable[..., Any]) -> None:
    size = 32 * MiB
    drive = faulty_drive(size, fill=0x5A, crawl=(0, MiB))  # about 30 s to read or erase
    copy = tmp_path / "copy.img"
    args = {"read": ["read", drive.path, str(copy)],
            "erase": ["erase", "--yes", "--zero", drive.path],
            "check": ["check", "--sha256", hashlib.sha256(b"\x5a" * 8 * MiB).hexdigest(),
                      "--size", str(8 * MiB), drive.path]}[command]
    master, slave = os.openpty()
    errors = tmp_path / "stderr"
    env = {**os.environ, "TERM": term, "COLUMNS": "100", "LINES": "30"}
    with errors.open("wb") as stderr:
        # setsid alone: a session with no controlling terminal, as `setsid` or a job that the
        # shell let go of: the hang-up sends it no SIGHUP.
        proc = subprocess.Popen([*popsicle_cmd(), *args], stdin=slave, stdout=slave,
                                stderr=stderr, preexec_fn=os.setsid, env=env)
    os.close(slave)
    try:
        _until_shown(master, proc, (lambda seen: seen.count(b"%") >= 3) if term != "dumb"
                     else (lambda seen: b"reading" in seen))
    finally:
        os.close(master)  # the terminal goes away
    drive.clear()  # no more crawling: the run can end
    status = proc.wait(timeout=60)
    said = errors.read_text()
    assert status == 0, said
    assert "unexpected error" not in said and "Traceback" not in said
    if command == "read":
        assert copy.read_bytes() == b"\x5a" * size
    if command == "erase":
        assert drive.read(0, 1 << 16) != b"\x5a" * (1 << 16)


def test_a_flash_under_nohup_outlives_its_terminal(
        tmp_path: Path, faulty_drive: Callable[..., Any]) -> None:
    """``nohup popsicle-py flash ...`` in a terminal that goes away: it ends as it would have
    (exit 0, the drive holds the image); the hang-up's SIGHUP stays ignored."""
    image = tmp_path / "image.img"
    data = os.urandom(8 * MiB)
    image.write_bytes(data)
    drive = faulty_drive(16 * MiB, fill=0, crawl=(0, MiB))
    master, slave = os.openpty()

    def child() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # its controlling terminal: the hang-up's SIGHUP

    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    proc = subprocess.Popen(["nohup", *popsicle_cmd(), "flash", "--yes", "--no-probe",
                             str(image), drive.path], stdin=slave, stdout=slave, stderr=slave,
                            preexec_fn=child, env=env, cwd=tmp_path)
    os.close(slave)
    out = tmp_path / "nohup.out"  # nohup's, as the output was a terminal
    try:
        _until_shown(master, proc, lambda shown: f"{drive.path}: writing".encode() in shown,
                     out)
    finally:
        os.close(master)  # the terminal hangs up: SIGHUP to its session's leader
    _until_delivered(proc.pid, signal.SIGHUP)
    drive.clear()
    status = proc.wait(timeout=60)
    said = out.read_text()
    assert status == 0, said
    assert "SIGHUP" not in said and "done: 1 of 1 drives ok" in said, said
    assert drive.read(0, len(data)) == data


def _until_delivered(pid: int, signum: int) -> None:
    """Until ``signum`` is pending in ``pid`` no more (handled, or ignored when sent)."""
    bit = 1 << (signum - 1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return
        pending = [int(line.split()[1], 16) for line in status.splitlines()
                   if line.startswith(("SigPnd:", "ShdPnd:"))]
        if not any(p & bit for p in pending):
            return
        time.sleep(0.01)
