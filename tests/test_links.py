"""USB link speeds: read from sysfs (umockdev fixtures, the VM tier's recordings), shown in
``list``, the rows and results, and the notes a person needs (USB 2.0, a crowded hub)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from popsicle_py import rows
from popsicle_py.ports import UsbLink, link_notes, parse_speed
from popsicle_py.units import format_link_speed
from tests.conftest import popsicle_cmd

FIXTURES = Path(__file__).resolve().parent / "fixtures"
needs_umockdev = pytest.mark.skipif(shutil.which("umockdev-run") is None,
                                    reason="umockdev-run is not installed")


def test_speeds_as_sysfs_says_them() -> None:
    assert [parse_speed(t) for t in ("480", "5000", "1.5", "12\n", "", "x", None)] == [
        480, 5000, 2, 12, None, None, None]
    assert [format_link_speed(s) for s in (12, 480, 5000, 10000, None)] == [
        "12 Mbit/s", "480 Mbit/s", "5 Gbit/s", "10 Gbit/s", "?"]


def test_notes_for_slow_links_and_crowded_hubs() -> None:
    assert link_notes([("/dev/sdb", UsbLink("2-1", 5000)), ("/dev/loop0", None)]) == []
    (usb2,) = link_notes([("/dev/sdb", UsbLink("1-2", 480))])
    assert usb2.startswith("/dev/sdb is on a USB 2.0 link (480 Mbit/s")
    crowded = link_notes([("/dev/sdb", UsbLink("2-3.1", 5000, "2-3", 5000)),
                          ("/dev/sdc", UsbLink("2-3.2", 5000, "2-3", 5000))])
    assert crowded == ["/dev/sdb, /dev/sdc share the hub at port 2-3, whose own link "
                       "(5 Gbit/s) is slower than theirs together (10 Gbit/s): they will share "
                       "its speed"]
    roomy = [("/dev/sdb", UsbLink("2-3.1", 5000, "2-3", 10000)),
             ("/dev/sdc", UsbLink("2-3.2", 5000, "2-3", 10000))]
    assert link_notes(roomy) == []
    assert link_notes(roomy[:1]) == []


def test_rows_show_the_link_only_when_the_width_allows() -> None:
    row = rows.Row(name="/dev/sdb", state="writing", port="1-2", label="SanDisk Cruzer",
                   link="480 Mbit/s", fraction=0.5, done=1, total=2, speed="20 MiB/s",
                   eta="0:10")
    wide = rows.plain(rows.layout([row], 160)[0])
    assert "480 Mbit/s" in wide and "SanDisk Cruzer" in wide
    narrow = rows.plain(rows.layout([row], 70)[0])
    assert "480 Mbit/s" not in narrow and len(narrow) <= 70


def _testbed(fixtures: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["umockdev-run"]
    for name in fixtures:
        cmd += ["-d", str(FIXTURES / name)]
    return subprocess.run([*cmd, "--", *popsicle_cmd(), *args], capture_output=True,
                          text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
                          env={**os.environ, "COLUMNS": "120"})


@needs_umockdev
@pytest.mark.umockdev
def test_list_says_when_sticks_crowd_a_hub() -> None:
    done = _testbed(["usb-hub-2sticks.umockdev"], "list")
    assert done.returncode == 0, done.stderr
    assert "note: /dev/sdf, /dev/sdg share the hub at port 2-3" in done.stdout
    listed = json.loads(_testbed(["usb-hub-2sticks.umockdev"], "list", "--json").stdout)
    assert {d["path"]: d["link_speed"] for d in listed} == {"/dev/sdf": 5000, "/dev/sdg": 5000}


@needs_umockdev
@pytest.mark.umockdev
def test_recorded_vm_stick_behind_a_full_speed_hub() -> None:
    """The VM tier's recording: qemu's usb-storage behind its hub enumerates at 12 Mbit/s."""
    done = _testbed(["vm-usb-stick-hub.umockdev"], "list", "--all")
    assert done.returncode == 0, done.stderr
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("/dev/sdc")]
    assert "12 Mbit/s" in row
    assert "note: /dev/sdc is on a USB 1 link (12 Mbit/s)" in done.stdout


@needs_umockdev
@pytest.mark.umockdev
def test_flash_results_carry_the_link_speed_and_the_note(tmp_path: Path) -> None:
    image = tmp_path / "image.img"
    image.write_bytes(os.urandom(1 << 20))
    done = _testbed(["cli-usb-stick.umockdev"], "flash", "--all-usb", "--yes", "--no-probe",
                    str(image), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    found = [json.loads(line) for line in done.stdout.splitlines()]
    start = next(e for e in found if e["event"] == "start")
    assert start["drives"][0]["link_speed"] == 480
    result = next(e for e in found if e["event"] == "result")
    assert result["drive"]["link_speed"] == 480
    plain = _testbed(["cli-usb-stick.umockdev"], "flash", "--all-usb", "--yes", "--no-probe",
                     str(image))
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "/dev/sdb is on a USB 2.0 link (480 Mbit/s" in plain.stdout + plain.stderr
