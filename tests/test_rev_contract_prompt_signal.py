"""SIGTERM or SIGHUP at the confirmation: the command says so and, with --json, ends with the
summary; exit 128 + the signal, nothing written.

Until the run installs its handlers, SIGTERM and SIGHUP had their default action: the process
died at the question with no word on stderr and no summary for the script that asked for
JSON (README: the last line is always the summary, also for a first signal).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import subprocess
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, popsicle_cmd

MiB = 1 << 20

pytestmark = pytest.mark.root


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_at_the_question_ends_with_the_summary(
        signum: int, tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    loop = loop_factory(8 * MiB, fill=0x5A)
    master, slave = os.openpty()

    def child() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    out = tmp_path / "events.jsonl"
    with out.open("wb") as stdout:
        proc = subprocess.Popen([*popsicle_cmd(), "flash", "--json", str(image), loop.path],
                                stdin=slave, stdout=stdout, stderr=slave, preexec_fn=child)
    os.close(slave)
    seen = bytearray()
    try:
        deadline = time.monotonic() + 30
        while b"[y/N]" not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, bytes(seen)
            if select.select([master], [], [], 0.1)[0]:
                seen += os.read(master, 65536)
        proc.send_signal(signum)
        status = proc.wait(timeout=20)
        while select.select([master], [], [], 0.2)[0]:
            seen += os.read(master, 65536)
    except OSError:
        status = proc.wait(timeout=20)
    finally:
        os.close(master)
    assert status == 128 + signum, bytes(seen)
    name = signal.Signals(signum).name
    assert f"{name}: stopped before writing: nothing was written".encode() in seen
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert events == [{"event": "summary", "ok": False, "results": []}]
    assert loop.read(8 * MiB) == bytes([0x5A]) * (8 * MiB)


def test_a_signal_as_the_question_shows_is_never_left_waiting_for_enter(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    """SIGTERM the moment ``[y/N]`` shows, again and again: it came between the question's
    showing and the read in about one try in three, where the handler ran in C and the read
    stayed blocked until Enter.  Each try must end within seconds."""
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    loop = loop_factory(8 * MiB, fill=0x5A)

    def child() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    for _ in range(12):
        master, slave = os.openpty()
        proc = subprocess.Popen([*popsicle_cmd(), "flash", str(image), loop.path],
                                stdin=slave, stdout=slave, stderr=slave, preexec_fn=child)
        os.close(slave)
        try:
            seen = bytearray()
            deadline = time.monotonic() + 30
            while b"[y/N]" not in seen:
                assert time.monotonic() < deadline and proc.poll() is None, bytes(seen)
                if select.select([master], [], [], 0.1)[0]:
                    seen += os.read(master, 65536)
            proc.send_signal(signal.SIGTERM)
            try:
                status = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail("SIGTERM at the question was left waiting for Enter")
        finally:
            os.close(master)
        assert status == 128 + signal.SIGTERM
    assert loop.read(8 * MiB) == bytes([0x5A]) * (8 * MiB)
