"""--sign-key with a key that needs a passphrase, in a terminal: refused before anything is
written (README: use ssh-agent and give the .pub file), never a prompt per drive."""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import popsicle_cmd
from tests.loopdev import Loop

pytestmark = pytest.mark.root
MiB = 1 << 20
PASSPHRASE = b"sekret words"


def _in_a_terminal(argv: list[str], deadline: float) -> tuple[int, bytes, int]:
    """Run ``argv`` with a pty as its controlling terminal, typing the passphrase at each
    prompt for one (as the person at it would); its exit status, what it showed, and how
    many prompts it made."""
    master, slave = os.openpty()

    def child() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, preexec_fn=child,
                            env={**os.environ, "TERM": "dumb"})
    os.close(slave)
    seen, prompts = bytearray(), 0
    try:
        end = time.monotonic() + deadline
        while proc.poll() is None and time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:  # the child closed its side
                    break
            if seen.count(b"Enter passphrase") > prompts:
                prompts += 1
                os.write(master, PASSPHRASE + b"\n")
    finally:
        if proc.poll() is None:
            proc.kill()
        code = proc.wait(timeout=30)
        os.close(master)
    return code, bytes(seen), prompts


def test_a_key_with_a_passphrase_is_refused_in_a_terminal(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    """It was asked for at the key's trial and again for each drive's certificate, on the
    live view's terminal; unanswered, the run stood 60 s at each drive's end."""
    key = tmp_path / "release.key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", PASSPHRASE.decode(), "-f",
                    str(key)], check=True)
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 * MiB))
    loop = loop_factory(2 * MiB, fill=0x5A)
    before = loop.read(2 * MiB)
    code, seen, prompts = _in_a_terminal(
        [*popsicle_cmd(), "flash", str(image), loop.path, "--yes", "--certificate",
         str(tmp_path / "certs"), "--sign-key", str(key)], deadline=50)
    shown = seen.decode(errors="replace")
    assert code == 2, shown
    assert prompts == 0, shown
    assert f"{key} needs a passphrase" in shown and "ssh-agent" in shown, shown
    assert loop.read(2 * MiB) == before
    assert not list((tmp_path / "certs").glob("*.json"))
