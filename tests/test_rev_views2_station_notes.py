"""station --json says the confirmation's notes as ``note`` events, first, as watch does.

With --yes a script is asked nothing, and the notes of the confirmation (an image that does
not look like a disk image) were said only on a terminal: --json dropped them.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import popsicle_cmd

pytestmark = pytest.mark.root


def test_station_json_says_the_confirmation_notes_first(tmp_path: Path) -> None:
    image = tmp_path / "image.img"
    image.write_bytes(os.urandom(1 << 20))  # no partition table: the confirmation warns
    proc = subprocess.Popen([*popsicle_cmd(), "station", "--yes", "--json", "--listen",
                             "127.0.0.1:0", "--journal", str(tmp_path / "journal.sqlite"),
                             str(image)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while not any('"watching"' in line for line in lines):
            assert time.monotonic() < deadline, lines
            if select.select([proc.stdout], [], [], 1)[0]:
                line = proc.stdout.readline()
                assert line, proc.stderr.read() if proc.stderr else ""
                lines.append(line)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in [*lines, *out.splitlines()]]
    assert events[0] == {"event": "note", "slot": None,
                         "text": f"{image} has no partition table, ISO 9660 or file system "
                                 "signature at its start: make sure it is a disk image"}
    assert events[1]["text"].startswith("station ")
    assert events[-1]["event"] == "summary"
