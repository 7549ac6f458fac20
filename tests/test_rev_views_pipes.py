"""Output that cannot be written, said as the README says: a reader that left is no failure, a
full disk is one line and exit 1, and a confirmation that cannot be shown writes nothing (2)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, popsicle_cmd

MiB = 1 << 20
FILL = 0xA5


def _reader_gone() -> int:
    """The write end of a pipe whose reader has already left: every write fails EPIPE."""
    read, write = os.pipe()
    os.close(read)
    return write


def test_a_listing_whose_reader_left_is_no_failure() -> None:
    """Rich exits 1 on a broken pipe: ``list --all | grep -q sda`` failed under pipefail."""
    write = _reader_gone()
    try:
        done = subprocess.run([*popsicle_cmd(), "list", "--all"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize("args", [("--help",), ("flash", "--help"), ("--version",)])
def test_help_to_a_full_disk_is_one_line_and_exit_1(args: tuple[str, ...]) -> None:
    """It was a traceback ending in ``OSError: [Errno 28] No space left on device``."""
    with open("/dev/full", "w") as full:
        done = subprocess.run([*popsicle_cmd(), *args], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        "popsicle-py: cannot write the output (No space left on device)"]


@pytest.mark.root
def test_a_confirmation_that_cannot_be_shown_writes_nothing_and_exits_2(
        loop_factory: Callable[..., Loop], tmp_path: object) -> None:
    """A terminal to answer on, but stderr (where the list of drives goes) a pipe whose
    reader left: Rich exited 1, a failure, where nothing asked is a refusal (2)."""
    image = os.path.join(str(tmp_path), "image.img")
    with open(image, "wb") as f:
        f.write(os.urandom(MiB))
    loop = loop_factory(4 * MiB, fill=FILL)
    master, slave = os.openpty()
    write = _reader_gone()
    try:
        proc = subprocess.Popen([*popsicle_cmd(), "flash", image, loop.path], stdin=slave,
                                stdout=slave, stderr=write)
        status = proc.wait(timeout=60)
    finally:
        for fd in (master, slave, write):
            os.close(fd)
    assert status == 2
    assert loop.read() == bytes([FILL]) * loop.size


@pytest.mark.root
def test_a_reader_that_pauses_never_fails_the_drives_as_stalled(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Callable[[int], None]],
        tmp_path: object) -> None:
    """``| less`` left on its page, a program that reads its child's output at the end: the
    pipe filled and the thread that runs the drives blocked writing an event.  The drives
    waited for the reader (nothing written while it was away), and those still at work when
    it came back were judged "stalled: no progress for N s" (exit 1).  The run must not
    wait for its reader."""
    import fcntl
    import json
    import time

    image = os.path.join(str(tmp_path), "image.img")
    data = os.urandom(8 * MiB)
    with open(image, "wb") as f:
        f.write(data)
    loop = loop_factory(16 * MiB, fill=FILL)
    add = throttle((loop, 4_000_000))
    read, write = os.pipe()
    fcntl.fcntl(write, 1031, 4096)  # F_SETPIPE_SZ: one page
    os.write(write, b"#" * 3995 + b"\n")  # nearly full: the first event does not fit
    stall = 1.5
    os.mkfifo(image + ".go")  # the command waits on it until it is throttled
    proc = subprocess.Popen(
        ["sh", "-c", 'echo "$$" > "$0.pid"; read go < "$0.go"; exec "$@"', image,
         *popsicle_cmd(), "flash", "--yes", "--json", "--stall-timeout", str(stall), image,
         loop.path], stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(image + ".pid") and time.monotonic() < deadline:
            time.sleep(0.05)
        add(int(Path(image + ".pid").read_text()))  # throttled before it starts: 4 MB/s
        with open(image + ".go", "w") as go:
            go.write("go\n")
        deadline = time.monotonic() + 60
        while loop.read(len(data)) != data:  # the drive written, head last, reader away
            assert time.monotonic() < deadline, "the drive was never written"
            time.sleep(0.2)
        time.sleep(2 * stall)  # the reader still away, longer than --stall-timeout
        out = b""
        while chunk := os.read(read, 65536):
            out += chunk
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        os.close(read)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = out.decode().splitlines()[1:]  # the page that was there before
    summary = json.loads(lines[-1])
    assert summary["event"] == "summary" and summary["ok"] is True, lines[-1]
    assert [r["status"] for r in summary["results"]] == ["ok"]


@pytest.mark.root
def test_ctrl_c_gives_the_shell_back_when_the_reader_takes_nothing(
        loop_factory: Callable[..., Loop], tmp_path: object) -> None:
    """A reader that neither reads nor leaves: the run blocked on its first event, and the
    first Ctrl-C could not end it (only a second one did).  Now the drives are written, and
    once a signal came a reader that takes nothing for a few seconds loses the rest."""
    import fcntl
    import signal
    import time

    image = os.path.join(str(tmp_path), "image.img")
    data = os.urandom(2 * MiB)
    Path(image).write_bytes(data)
    loop = loop_factory(4 * MiB, fill=FILL)
    read, write = os.pipe()
    fcntl.fcntl(write, 1031, 4096)  # F_SETPIPE_SZ: one page
    os.write(write, b"#" * 4096)  # full: nothing more goes in until somebody reads
    proc = subprocess.Popen([*popsicle_cmd(), "flash", "--yes", "--json", image, loop.path],
                            stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    try:
        deadline = time.monotonic() + 60
        while loop.read(len(data)) != data:  # written, its head last, though nobody reads
            assert time.monotonic() < deadline, "the drive was never written"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=4 * 3.0)
    finally:
        os.close(read)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == 130
    assert proc.stderr is not None
    assert "the output's reader takes nothing: the rest of the output is dropped" in \
        proc.stderr.read()
