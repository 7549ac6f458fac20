"""station --customize under umockdev: the stick in slot A2 gets A2's row, its journal record
holds the values (secrets redacted)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pi_image
import pytest
from conftest import popsicle_cmd
from station_rig import Rig, slot_map
from test_bootfs_children import alive
from test_watch import Stick, needs_testbed

pytestmark = [needs_testbed, pytest.mark.umockdev]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK7y7UxIbBf10hjkkKaoDhFxSFdfZG1ZjTmXCUdxf9Rz a@x"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with Rig(tmp_path / "rig") as rig:
        yield rig


def test_the_stick_in_a_slot_gets_that_slots_row(rig: Rig, tmp_path: Path) -> None:
    image = pi_image.build(tmp_path, table="gpt")
    toml, values = tmp_path / "lab.toml", tmp_path / "lab.csv"
    toml.write_text('hostname = "{name}"\nuser = "student"\npassword = "secret words"\n'
                    'ssh_authorized_keys = ["{ssh_key}"]\n')
    values.write_text(f"slot,name,ssh_key\nA1,bench-left,{KEY}\nA2,bench-right,{KEY}\n")
    slots = slot_map(tmp_path / "slots.toml", {"A1": 3, "A2": 5})
    journal = tmp_path / "j.sqlite"
    stick = Stick("d", 5)
    rig.start([str(image), "--yes", "--slots", str(slots), "--journal", str(journal),
               "--listen", "127.0.0.1:0", "--count", "1", "--customize", str(toml),
               "--values", str(values), "--customize-format", "cloud-init"])
    rig.add(stick.description)
    result = rig.wait(event="result", device=stick.dev, slot="A2")
    assert result["status"] == "ok", result
    assert result["customized"]["values"]["hostname"] == "bench-right"
    assert rig.wait_exit() == 0
    written = tmp_path / "d.img"
    written.write_bytes(rig.read(stick.dev) or b"")
    user_data = subprocess.run(["mtype", "-i", f"{written}@@{4 << 20}", "::/user-data"],
                               capture_output=True, check=True).stdout
    assert b'hostname: "bench-right"' in user_data and b"secret words" not in user_data
    done = subprocess.run([*popsicle_cmd(), "records", "--journal", str(journal), "--json"],
                          capture_output=True, text=True, check=True)
    (row,) = json.loads(done.stdout)
    customized = json.loads(row["customized"])
    assert customized["values"]["hostname"] == "bench-right"
    assert customized["values"]["password"] == "<redacted>"


@pytest.mark.parametrize("how", ["mcopy fails", "pulled during mcopy"])
def test_a_failed_stick_gives_its_slots_row_back(rig: Rig, tmp_path: Path, how: str) -> None:
    """Rows keyed by slot: the first stick in A1 fails in its boot-files step (its mcopy
    fails, or it is pulled while its mcopy runs: that mcopy is gone by its result); the stick
    that replaces it in A1 gets A1's row and ends ok.  A drive that ended ok keeps it: a third
    stick in A1 is refused, never written."""
    image = pi_image.build(tmp_path, table="mbr")
    toml, values = tmp_path / "lab.toml", tmp_path / "lab.csv"
    toml.write_text('hostname = "{name}"\n')
    values.write_text("slot,name\nA1,bench-left\nA2,bench-right\n")
    slots = slot_map(tmp_path / "slots.toml", {"A1": 3, "A2": 5})
    fake, once, fifo = tmp_path / "bin", tmp_path / "once", tmp_path / "mcopy.pid"
    fake.mkdir()
    os.mkfifo(fifo)
    first_time = ("echo 'stand-in: no' >&2; exit 1" if how == "mcopy fails"
                  else f"echo $$ > {fifo}; exec sleep 300")
    (fake / "mcopy").write_text(f"#!/bin/sh\n[ -e {once} ] && exec /usr/bin/mcopy \"$@\"\n"
                                f"touch {once}; {first_time}\n")
    (fake / "mcopy").chmod(0o755)
    rig.start([str(image), "--yes", "--slots", str(slots), "--journal",
               str(tmp_path / "j.sqlite"), "--listen", "127.0.0.1:0", "--no-power-off",
               "--customize", str(toml), "--values", str(values), "--customize-format",
               "cloud-init"], env={"PATH": f"{fake}:{os.environ['PATH']}"})
    first, second, third = Stick("c", 3), Stick("d", 3), Stick("e", 3)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # no writer yet: not readable
    pid = 0
    try:
        rig.add(first.description)
        if how == "pulled during mcopy":
            ready, _, _ = select.select([reader], [], [], 60)
            assert ready, "mcopy never started"
            pid = int(os.read(reader, 64).split()[0])
            rig.remove(first.unplug)
        failed = rig.wait(event="result", device=first.dev)
        assert failed["status"] == "failed", failed
        assert ("stand-in: no" if how == "mcopy fails" else "removed") in failed["error"]
        assert not (pid and alive(pid)), "mcopy outlived its drive's result"
    finally:
        os.close(reader)
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)
    if how == "mcopy fails":
        rig.remove(first.unplug)
    rig.add(second.description)
    added = rig.wait(event="drive_added", device=second.dev)
    assert added["eligible"], added
    result = rig.wait(event="result", device=second.dev)
    assert result["status"] == "ok", result
    assert result["customized"]["values"]["hostname"] == "bench-left"
    rig.remove(second.unplug)
    rig.add(third.description)
    refused = rig.wait(event="drive_added", device=third.dev)
    assert not refused["eligible"] and "bench-left" in refused["reason"], refused
    assert rig.read(third.dev) == b""
    rig.post("/api/stop")
    assert rig.wait_exit() == 0


def test_present_sticks_beyond_the_rows_are_left_alone(rig: Rig, tmp_path: Path) -> None:
    """--include-present with one row and two sticks present: both are seen before any event
    is delivered, yet each is checked against its own row: the first is written, the second
    (drive 2, no row) is refused and never written."""
    image = pi_image.build(tmp_path, table="mbr")
    toml, values = tmp_path / "lab.toml", tmp_path / "lab.csv"
    toml.write_text('hostname = "{name}"\n')
    values.write_text("seq,name\n1,pi-one\n")
    slots = slot_map(tmp_path / "slots.toml", {"A1": 3, "A2": 5})
    sticks = Stick("c", 3), Stick("d", 5)
    for stick in sticks:
        rig.add(stick.description)
    rig.start([str(image), "--yes", "--slots", str(slots), "--journal",
               str(tmp_path / "j.sqlite"), "--listen", "127.0.0.1:0", "--no-power-off",
               "--include-present", "--customize", str(toml), "--values", str(values),
               "--customize-format", "cloud-init"])
    added = {e["device"]: e for e in rig.events() if e.get("event") == "drive_added"}
    (taken,) = [s for s in sticks if added[s.dev]["eligible"]]
    (left,) = [s for s in sticks if not added[s.dev]["eligible"]]
    assert added[taken.dev]["drive"]["seq"] == 1
    assert "has no row for drive 2" in added[left.dev]["reason"], added[left.dev]
    result = rig.wait(event="result", device=taken.dev)
    assert result["status"] == "ok", result
    assert result["customized"]["values"]["hostname"] == "pi-one"
    rig.post("/api/stop")
    assert rig.wait_exit() == 0
    assert not [e for e in rig.events() if e.get("event") == "result"
                and e["device"] == left.dev]
    assert rig.read(left.dev) == b""
