"""``popsicle-py verify``: an image that changes while it is read is no match (review and fix,
session 19).

Before: an image file cut short while verify read it ended the comparison where the file
now ended, and the drive was "ok (matches the image)", only part of it compared (its
``device_sha256`` that of the part); an image written to in place gave "ok" for a mix of old
and new bytes.  flash fails both ("the image ... changed while it was read").
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import popsicle_cmd
from tests.faulty import FaultyDrive

MiB = 1 << 20
SIZE = 80 * MiB  # more than the ring (4 x 16 MiB): its reader is still reading when it changes


@pytest.mark.root
@pytest.mark.parametrize("change", ["cut short", "written to"])
def test_an_image_that_changes_while_verify_reads_it_fails_every_drive(
        faulty_drive: Callable[..., FaultyDrive], tmp_path: Path, change: str) -> None:
    data = os.urandom(SIZE)
    image = tmp_path / "disk.img"
    image.write_bytes(data)
    drive = faulty_drive(SIZE, content=data, crawl=(0, 16 * MiB))  # about 5 s to read
    proc = subprocess.Popen([*popsicle_cmd(), "verify", str(image), drive.path, "--json"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    events: list[dict[str, Any]] = []
    changed = False
    try:
        while not events or events[-1]["event"] != "summary":
            line = proc.stdout.readline()
            assert line, events[-3:]
            events.append(json.loads(line))
            if events[-1]["event"] == "progress" and not changed:  # the drive is being read
                if change == "cut short":
                    os.truncate(image, 32 * MiB)
                else:
                    with open(image, "r+b") as f:
                        f.write(bytes([data[0] ^ 1]))
                changed = True
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    [result] = [e for e in events if e["event"] == "result"]
    assert (result["status"], result["cause"]) == ("failed", "source"), result
    assert "changed while" in result["error"] or "truncated or changed" in result["error"]
    assert result["device_sha256"] is None
    assert proc.returncode == 1
