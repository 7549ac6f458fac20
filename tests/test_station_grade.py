"""A station grades and certifies: its certificates say which station, batch, operator and
slot; its journal keeps each drive's read-back SHA-256 and USB link speed (umockdev sticks)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import popsicle_cmd
from station_rig import MiB, Rig, slot_map
from test_watch import Stick, needs_testbed

pytestmark = [needs_testbed, pytest.mark.umockdev]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Rig(tmp_path / "rig") as rig:
        yield rig


def test_station_certificates_name_the_station_batch_operator_and_slot(
        rig: Rig, tmp_path: Path) -> None:
    data = os.urandom(1 * MiB + 3)
    image = tmp_path / "image.img"
    image.write_bytes(data)
    certs, journal = tmp_path / "certs", tmp_path / "j.sqlite"
    slots = slot_map(tmp_path / "slots.toml", {"A1": 3})
    rig.start([str(image), "--yes", "--slots", str(slots), "--journal", str(journal),
               "--listen", "127.0.0.1:0", "--count", "1", "--batch", "B-7",
               "--operator", "ana", "--name", "bench-1", "--certificate", str(certs)])
    stick = Stick("c", 3)
    rig.add(stick.description)
    rig.wait(event="result", device=stick.dev, status="ok", slot="A1")
    assert rig.wait_exit() == 0
    digest = hashlib.sha256(data).hexdigest()
    (cert,) = [json.loads(p.read_text()) for p in certs.glob("*.json")]
    assert cert["station"] == {"name": "bench-1", "batch": "B-7", "operator": "ana"}
    assert cert["drive"]["slot"] == "A1" and cert["drive"]["link_speed"] == 480
    assert cert["device"]["sha256"] == digest
    assert cert["image"]["sha256"] == digest  # the station hashed its local image
    done = subprocess.run([*popsicle_cmd(), "records", "--journal", str(journal), "--json"],
                          capture_output=True, text=True, check=True)
    (row,) = json.loads(done.stdout)
    assert (row["device_sha256"], row["link_speed"], row["slot"]) == (digest, 480, "A1")
