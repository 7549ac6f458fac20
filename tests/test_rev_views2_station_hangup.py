"""A station whose terminal goes away ends as a station does, never as "unexpected error".

The station's plain lines go through a stream that puts each line's slot in front of it; it
has no descriptor of its own, and the EIO of a vanished terminal made the view's
"the reader left" path ask it for one: "unexpected error: '_Prefixed' object has no
attribute 'fileno'", exit 1, at the first line written after the hang-up.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import subprocess
import termios
import time
from pathlib import Path

import pytest
from conftest import popsicle_cmd

from popsicle_py import events
from popsicle_py.station.view import SlotPlainView


class _GoneTerminal:
    """A terminal that hung up: every write fails with EIO."""

    def write(self, text: str) -> int:
        raise OSError(errno.EIO, "Input/output error")

    def flush(self) -> None:
        raise OSError(errno.EIO, "Input/output error")


def test_a_slot_view_whose_terminal_is_gone_goes_on_quietly() -> None:
    view = SlotPlainView(_GoneTerminal())  # type: ignore[arg-type]
    view.handle(events.Note("station vm: http://127.0.0.1:1/"), None)
    view.handle(events.Note("drive in slot 3"), "3")  # nothing more is tried, nothing raised
    view.close()


@pytest.mark.root
def test_a_station_whose_terminal_hangs_up_ends_without_an_unexpected_error(
        tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    master, slave = os.openpty()
    errors = tmp_path / "stderr"

    def child() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    env = {**os.environ, "TERM": "xterm-256color"}
    with errors.open("wb") as stderr:
        proc = subprocess.Popen([*popsicle_cmd(), "station", "--yes", "--listen", "127.0.0.1:0",
                                 "--journal", str(tmp_path / "journal.sqlite"), str(image)],
                                stdin=slave, stdout=slave, stderr=stderr, preexec_fn=child,
                                env=env)
    os.close(slave)
    try:
        seen = bytearray()
        deadline = time.monotonic() + 30
        while b"watching" not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, bytes(seen)
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                seen += os.read(master, 65536)
    finally:
        os.close(master)  # the terminal hangs up
    try:
        status = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    said = errors.read_text()
    assert "unexpected error" not in said, said
    assert status == 0, said  # SIGHUP with no drive being written: a station's normal end
