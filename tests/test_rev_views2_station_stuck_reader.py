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
import subprocess
import time
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
        proc = subprocess.Popen([*popsicle_cmd(), "station", "--yes", "--listen", "127.0.0.1:0",
                                 "--journal", str(journal), *(["--json"] if as_json else []),
                                 str(image)], stdin=subprocess.DEVNULL, stdout=write_end,
                                stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    try:
        deadline = time.monotonic() + 30
        # The run began (its signals are the station's), the confirmation's note said before
        # it: its first piece in the pipe, the rest waiting on the reader.
        while not journal.exists():
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
    assert status == 0, err  # no drive was being written: a station's normal end
    assert b"the output's reader takes nothing" in err
