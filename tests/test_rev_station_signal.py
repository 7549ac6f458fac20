"""``station`` stopped by a signal while drives are being written (umockdev): the shell back
on time with 128 + signal, each drive in flight recorded ``cancelled`` and its head never the
image's, the finished one kept ``ok``; the page says the station ended."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import popsicle_cmd
from faulty import FaultyFile, faulty_files
from station_rig import MiB, Rig, slot_map
from test_watch import Stick, needs_testbed

pytestmark = [needs_testbed, pytest.mark.umockdev]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Rig(tmp_path / "rig") as rig:
        yield rig


def test_sigterm_mid_write_cancels_the_drives_in_flight_and_keeps_their_heads_safe(
        rig: Rig, tmp_path: Path) -> None:
    sig = signal.SIGTERM  # a service's stop (SIGINT is watch's own tests')
    data = os.urandom(48 * MiB + 512)  # at 2 MiB/s for both: neither ends first
    a, b = Stick("c", 3, 128 * MiB), Stick("d", 5, 128 * MiB)
    slots = slot_map(tmp_path / "slots.toml", {"A1": 3, "A2": 5})
    journal = tmp_path / "journal.sqlite"
    with faulty_files() as made:
        image = FaultyFile(len(data), content=data)
        made.append(image)
        rig.start([image.file, "--yes", "--force", "--slots", str(slots), "--journal",
                   str(journal), "--listen", "127.0.0.1:0", "--no-power-off"])
        image.set(crawl=(0, 2 * MiB))  # once its SHA-256 is read: the sticks' read crawls
        rig.add(a.description)
        rig.add(b.description)
        rig.wait(event="progress", device=a.dev, phase="writing")
        rig.wait(event="progress", device=b.dev, phase="writing")
        started = time.monotonic()
        rig.signal(sig)
        status = rig.wait_exit(30)
        took = time.monotonic() - started
    assert status == 128 + sig
    assert took < 10, took
    results = {e["device"]: e for e in rig.events() if e.get("event") == "result"}
    assert {d: r["status"] for d, r in results.items()} == {a.dev: "cancelled",
                                                           b.dev: "cancelled"}
    for stick in (a, b):
        head = (rig.read(stick.dev) or b"")[: 64 << 10]
        assert head[:4096] != data[:4096], f"{stick.dev} holds the image's head"
    done = subprocess.run([*popsicle_cmd(), "records", "--journal", str(journal), "--json"],
                          capture_output=True, text=True, check=True)
    assert sorted(r["result"] for r in json.loads(done.stdout)) == ["cancelled", "cancelled"]
