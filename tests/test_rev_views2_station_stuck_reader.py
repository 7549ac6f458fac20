"""A station whose output's reader stops reading still ends at Ctrl-C, within seconds.

watch's views give a stuck reader ``Out.GIVE_UP`` seconds once a signal came; the station never
told its terminal view that a signal came (its JSON), and its plain lines went through a stream
with no descriptor, written as blocking writes: with ``| less`` left on its first page, SIGINT
never gave the shell back.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import popsicle_cmd

pytestmark = pytest.mark.root

F_SETPIPE_SZ = 1031


@pytest.mark.parametrize("as_json", [True, False])
def test_a_station_into_a_stuck_pipe_ends_at_sigint(tmp_path: Path, as_json: bool) -> None:
    deep = tmp_path.joinpath(*["d" * 200] * 19)  # its name fills the pipe's one page
    deep.mkdir(parents=True)
    image = deep / "image.img"
    image.write_bytes(os.urandom(1 << 20))  # its note names it
    journal = tmp_path / "journal.sqlite"
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)
    try:
        port = _free_port()
        proc = subprocess.Popen([*popsicle_cmd(), "station", "--yes", "--listen",
                                 f"127.0.0.1:{port}",
                                 "--journal", str(journal), *(["--json"] if as_json else []),
                                 str(image)], stdin=subprocess.DEVNULL, stdout=write_end,
                                stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    try:
        deadline = time.monotonic() + 30
        # The page answers: the run began (its signals are the station's), the confirmation's
        # note said before it, its first piece in the pipe, the rest waiting on the reader.
        while not _answers(f"http://127.0.0.1:{port}/api/slots"):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=15)  # GIVE_UP (3 s) after the signal, then the end
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(read_end)
    # 0 once it watched (no drive was being written), 130 while it was still preparing.
    assert status in (0, 130), err
    assert b"the output's reader takes nothing" in err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False
