"""Output that cannot be written, said as the README says: a reader that left is no failure, a
full disk is one line and exit 1, and a confirmation that cannot be shown writes nothing (2)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

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
