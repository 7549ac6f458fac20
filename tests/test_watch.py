"""Duplicator mode (``popsicle-py watch``) under umockdev, with real udev events.

Each test runs tests/watch_driver.py under ``umockdev-wrapper``: it starts the installed
command with the testbed in its environment, waits for ``{"event": "watching"}`` on its JSON
stdout, then plugs and unplugs drives (real "add"/"remove" uevents that the command's
pyudev.Monitor receives), synchronizing on the command's own events, never on sleeps.
The bytes written and the sysfs ``remove`` attributes are read back from the testbed.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import popsicle_cmd
from faulty import FaultyFile, faulty_files
from rich.console import Console

from popsicle_py import events
from popsicle_py.view import PlainView, WatchView
from popsicle_py.watch_power import STOPPED, bounded

MiB = 1 << 20
HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
DRIVER = HERE / "watch_driver.py"
SYSTEM_PYTHON = "/usr/bin/python3"


def _have_umockdev_gi() -> bool:
    if shutil.which("umockdev-wrapper") is None or not os.path.exists(SYSTEM_PYTHON):
        return False
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import gi; gi.require_version('UMockdev', "
                            "'1.0'); from gi.repository import UMockdev"],
                           capture_output=True, check=False)
    return probe.returncode == 0


needs_testbed = pytest.mark.skipif(not _have_umockdev_gi(),
                                   reason="needs umockdev-wrapper and python3-gi's UMockdev")


# ----------------------------------------------------------------------------------------------
# Mock drives


@dataclass(frozen=True)
class Stick:
    """A USB stick in port ``1-port`` of the testbed: /dev/sd<letter>."""

    letter: str
    port: int
    size: int = 64 * MiB

    @property
    def dev(self) -> str:
        return f"/dev/sd{self.letter}"

    @property
    def usb(self) -> str:
        return f"/devices/pci0000:00/0000:00:14.0/usb1/1-{self.port}"

    @property
    def disk(self) -> str:
        """The disk's sysfs path (what a "remove" uevent names)."""
        host = 10 + self.port
        return (f"/sys{self.usb}/1-{self.port}:1.0/host{host}/target{host}:0:0/{host}:0:0:0"
                f"/block/sd{self.letter}")

    @property
    def unplug(self) -> list[str]:
        """Every sysfs path of the stick, deepest first: what pulling it out removes."""
        host = 10 + self.port
        interface = f"/sys{self.usb}/1-{self.port}:1.0"
        return [self.disk, f"{interface}/host{host}/target{host}:0:0/{host}:0:0:0",
                f"{interface}/host{host}", f"/sys{self.usb}"]

    @property
    def remove_attr(self) -> str:
        return f"/sys{self.usb}/remove"

    @property
    def description(self) -> str:
        """The stick as the kernel shows it.  Its disk's MAJOR and MINOR go with every uevent,
        as the kernel's do: a "remove" is matched by them once the disk's sysfs is gone."""
        host = 10 + self.port
        serial = f"4C53000123110511{self.port:04d}"
        minor = (ord(self.letter) - ord("a")) * 16
        return f"""P: {self.usb}
N: bus/usb/001/{self.port:03d}
E: DEVTYPE=usb_device
E: SUBSYSTEM=usb
E: DRIVER=usb
A: speed=480
A: remove=
A: idVendor=0781
A: idProduct=5567
A: serial={serial}
A: manufacturer=SanDisk
A: product=Cruzer Blade

P: {self.usb}/1-{self.port}:1.0/host{host}
E: DEVTYPE=scsi_host
E: SUBSYSTEM=scsi

P: {self.usb}/1-{self.port}:1.0/host{host}/target{host}:0:0/{host}:0:0:0
E: DEVTYPE=scsi_device
E: SUBSYSTEM=scsi
A: vendor=SanDisk
A: model=Cruzer Blade

P: {self.disk.removeprefix("/sys")}
N: sd{self.letter}
E: DEVNAME=/dev/sd{self.letter}
E: MAJOR=8
E: MINOR={minor}
E: DEVTYPE=disk
E: SUBSYSTEM=block
E: ID_BUS=usb
E: ID_VENDOR=SanDisk
E: ID_MODEL=Cruzer_Blade
E: ID_SERIAL=SanDisk_Cruzer_Blade_{serial}-0:0
E: ID_SERIAL_SHORT={serial}
A: removable=1
A: size={self.size // 512}
A: ro=0
A: dev=8:{minor}
A: queue/logical_block_size=512
"""


B, C, D = Stick("b", 2), Stick("c", 3), Stick("d", 5)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# ----------------------------------------------------------------------------------------------
# Running a scenario


@dataclass
class Run:
    rc: int
    events: list[dict[str, Any]]
    stdout: list[str]
    stderr: str
    files: dict[str, bytes | None]

    def of(self, kind: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind
                and all(e.get(k) == v for k, v in fields.items())]

    @property
    def summary(self) -> dict[str, Any]:
        (summary,) = self.of("summary")
        assert self.events[-1] is summary, "the summary is not the last event"
        return summary

    def results(self) -> dict[str, dict[str, Any]]:
        return {r["device"]: r for r in self.summary["results"]}


def watch(tmp_path: Path, args: list[str], steps: list[dict[str, Any]], *,
          present: tuple[str, ...] = (), read: tuple[str, ...] = (),
          env: dict[str, str] | None = None, as_json: bool = True, timeout: float = 40) -> Run:
    work = tmp_path / "driver"
    scenario = {
        "cmd": [*popsicle_cmd(), "watch", *args, *(["--json"] if as_json else [])],
        "env": env or {},
        "present": list(present),
        "steps": steps,
        "read": list(read),
        "timeout": timeout,
        "out": str(tmp_path / "report.json"),
        "dir": str(work),
    }
    (tmp_path / "scenario.json").write_text(json.dumps(scenario))
    done = subprocess.run(["umockdev-wrapper", SYSTEM_PYTHON, str(DRIVER),
                           str(tmp_path / "scenario.json")], capture_output=True, text=True,
                          timeout=timeout + 20, check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["problems"], (report["problems"], report["stdout"], report["stderr"])
    files = {path: None if name is None else (work / name).read_bytes()
             for path, name in report["read"].items()}
    assert "Traceback" not in report["stderr"], report["stderr"]
    parsed = [json.loads(line) for line in report["stdout"]] if as_json else []
    return Run(report["rc"], parsed, report["stdout"], report["stderr"], files)


def image_file(tmp_path: Path, size: int, name: str = "image.img") -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


WATCHING = {"wait": {"event": "watching"}}


def result_of(stick: Stick) -> dict[str, Any]:
    return {"wait": {"event": "result", "device": stick.dev}}


# ----------------------------------------------------------------------------------------------
# Hotplug, end to end


@needs_testbed
@pytest.mark.umockdev
def test_two_drives_plugged_in_one_after_the_other_are_flashed_verified_and_powered_off(
        tmp_path: Path) -> None:
    image, data = image_file(tmp_path, 3 * MiB + 4321)
    run = watch(tmp_path, [str(image), "--yes", "--count", "2"],
                [WATCHING, {"add": C.description}, result_of(C),
                 {"add": D.description}, result_of(D)],
                present=(B.description,),
                read=(B.dev, C.dev, D.dev, B.remove_attr, C.remove_attr, D.remove_attr))

    assert run.rc == 0, run.stderr
    # The stick plugged in before watching is left alone, and said so.
    assert run.files[B.dev] == b""
    assert run.files[B.remove_attr] == b""
    assert not run.of("drive_added", device=B.dev)
    assert any(B.dev in e["text"] for e in run.of("note"))
    # Both arrivals: announced, written, verified from the device, then powered off.
    for seq, stick in enumerate((C, D), 1):
        (added,) = run.of("drive_added", device=stick.dev)
        identity = {"seq": seq, "port_path": f"1-{stick.port}", "vendor": "SanDisk",
                    "model": "Cruzer Blade", "serial": f"4C53000123110511{stick.port:04d}",
                    "size": stick.size, "link_speed": 480}
        assert added == {"event": "drive_added", "device": stick.dev,
                         "label": "SanDisk Cruzer Blade", "size": stick.size,
                         "eligible": True, "reason": None, "drive": identity}
        assert run.results()[stick.dev]["drive"] == identity
        assert any(e["text"].startswith(f"{stick.dev} is on a USB 2.0 link (480 Mbit/s")
                   for e in run.of("note"))
        assert (run.files[stick.dev] or b"")[: len(data)] == data
        assert run.files[stick.remove_attr] == b"1"
        assert run.of("phase", device=stick.dev, phase="verifying")
        assert run.of("phase", device=stick.dev, phase="done", detail="powered off")
    # One after the other: D was plugged in only after C's result.
    kinds = [(e["event"], e.get("device")) for e in run.events]
    assert kinds.index(("result", C.dev)) < kinds.index(("drive_added", D.dev))
    assert kinds.index(("watching", None)) < kinds.index(("drive_added", C.dev))
    summary = run.summary
    assert summary["ok"] is True
    assert [(r["device"], r["status"], r["bytes_written"]) for r in summary["results"]] == [
        (C.dev, "ok", len(data)), (D.dev, "ok", len(data))]


@needs_testbed
@pytest.mark.umockdev
def test_a_stick_written_after_the_image_file_changed_fails(tmp_path: Path) -> None:
    """The image was checked when the watch began: a stick written after the file changed
    would not be a copy of that image (nor of the others), and fails, its head not written."""
    image, data = image_file(tmp_path, 3 * MiB)
    run = watch(tmp_path, [str(image), "--yes", "--count", "2"],
                [WATCHING, {"add": C.description}, result_of(C),
                 {"flip": str(image), "offset": 2 * MiB}, {"add": D.description},
                 result_of(D)],
                read=(C.dev, D.dev))
    assert run.rc == 1, run.stderr
    results = run.results()
    assert results[C.dev]["status"] == "ok"
    assert (run.files[C.dev] or b"")[: len(data)] == data
    assert results[D.dev]["status"] == "failed"
    assert results[D.dev]["error"] == (f"{D.dev}: the image {image} changed while it was read "
                                       "(it was written to): no drive holds it")
    assert (run.files[D.dev] or b"")[: 64 << 10] != data[: 64 << 10]  # no head of it


@needs_testbed
@pytest.mark.umockdev
def test_two_sticks_given_the_same_name_are_told_apart_in_results_and_report(
        tmp_path: Path) -> None:
    """The kernel hands a pulled stick's name to the next one: port, serial and seq differ."""
    image, data = image_file(tmp_path, 2 * MiB + 99)
    first, second = Stick("c", 3), Stick("c", 4)
    report = tmp_path / "sticks.csv"
    jsonl = tmp_path / "sticks.jsonl"
    report.write_text("")  # an existing empty file gets the header too
    steps: list[dict[str, Any]] = [WATCHING, {"add": first.description}, result_of(first),
             {"remove": first.unplug}, {"wait": {"event": "drive_removed", "device": "/dev/sdc"}},
             {"add": second.description}, result_of(second)]
    run = watch(tmp_path, [str(image), "--yes", "--count", "2", "--no-power-off",
                           "--report", str(report)], steps)
    assert run.rc == 0, run.stderr
    results = run.summary["results"]
    assert [r["device"] for r in results] == ["/dev/sdc", "/dev/sdc"]
    assert [(r["drive"]["seq"], r["drive"]["port_path"]) for r in results] == [
        (1, "1-3"), (2, "1-4")]
    assert all(r["verified"] is True for r in results)
    import csv
    rows = list(csv.DictReader(report.open()))
    assert [(r["seq"], r["device"], r["port_path"], r["serial"], r["result"], r["verified"])
            for r in rows] == [
        ("1", "/dev/sdc", "1-3", "4C530001231105110003", "ok", "true"),
        ("2", "/dev/sdc", "1-4", "4C530001231105110004", "ok", "true")]
    for r in rows:
        assert r["capacity"] == str(64 * MiB) and r["image"] == "image.img"
        assert r["bytes_written"] == str(len(data)) and r["bytes_skipped"] == "0"
        assert int(r["write_speed"]) > 0 and int(r["verify_speed"]) > 0
        assert r["started"] <= r["ended"] and r["ended"].endswith("Z")
    # JSON Lines, appended to: a second session adds its records after the first's.
    for _ in range(2):
        watch(tmp_path, [str(image), "--yes", "--count", "1", "--no-power-off",
                         "--no-verify", "--report", str(jsonl)],
              [WATCHING, {"add": first.description}, result_of(first)])
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["seq"], r["port_path"], r["result"], r["verified"], r["verify_speed"])
            for r in lines] == [(1, "1-3", "ok", False, None)] * 2


@needs_testbed
@pytest.mark.umockdev
def test_ineligible_drives_are_announced_and_left_alone(tmp_path: Path) -> None:
    image, data = image_file(tmp_path, 1 * MiB)
    sata, emmc, reader = (fixture(n) for n in ("sata.umockdev", "emmc.umockdev",
                                               "usb-reader-empty.umockdev"))
    run = watch(tmp_path, [str(image), "--yes", "--count", "1"],
                [WATCHING, {"add": sata}, {"wait": {"event": "drive_added", "device": "/dev/sda"}},
                 {"add": emmc}, {"wait": {"event": "drive_added", "device": "/dev/mmcblk1"}},
                 {"add": reader}, {"wait": {"event": "drive_added", "device": "/dev/sdf"}},
                 {"add": C.description}, result_of(C)],
                read=("/dev/sda", "/dev/mmcblk1", "/dev/sdf", C.dev))

    assert run.rc == 0, run.stderr
    ignored = {e["device"]: e for e in run.of("drive_added", eligible=False)}
    assert set(ignored) >= {"/dev/sda", "/dev/mmcblk1", "/dev/sdf"}
    assert "not a USB or SD drive" in ignored["/dev/sda"]["reason"]
    assert "eMMC" in ignored["/dev/mmcblk1"]["reason"]
    assert ignored["/dev/sdf"]["reason"] == "no medium"
    for path in ("/dev/sda", "/dev/mmcblk1", "/dev/sdf"):
        assert run.files[path] in (b"", None), f"{path} was written"
        assert not run.of("phase", device=path)
    assert list(run.results()) == [C.dev]
    assert (run.files[C.dev] or b"")[: len(data)] == data


@needs_testbed
@pytest.mark.umockdev
def test_drive_removed_mid_write_fails_as_removed_while_the_other_completes(
        tmp_path: Path) -> None:
    # The image crawls (a FUSE file, tests/faulty.py: 2 MiB/s), so the pull lands mid-write
    # however late it is seen (a fast 64 MiB write could end before it on a loaded machine).
    data = os.urandom(8 * MiB + 512)
    big_c, big_d = Stick("c", 3, 128 * MiB), Stick("d", 5, 128 * MiB)
    with faulty_files() as made:
        image = FaultyFile(len(data), content=data, faults={"crawl": (0, 2 * MiB)})
        made.append(image)
        run = watch(tmp_path, [str(image.file), "--yes", "--force", "--count", "2"],
                    [WATCHING, {"add": big_c.description}, {"add": big_d.description},
                     {"wait": {"event": "progress", "device": big_d.dev, "phase": "writing"}},
                     {"remove": big_d.unplug}],  # --count 2 ends the session
                    read=(big_c.dev, big_c.remove_attr, big_d.remove_attr), timeout=60)

    assert run.rc == 1, run.stderr
    results = run.results()
    assert results[big_c.dev]["status"] == "ok"
    assert (run.files[big_c.dev] or b"")[: len(data)] == data
    assert run.files[big_c.remove_attr] == b"1"
    removed = results[big_d.dev]
    assert removed["status"] == "failed"
    assert removed["error"] == f"{big_d.dev}: the drive was removed"
    assert run.of("drive_removed", device=big_d.dev)
    assert run.of("phase", device=big_d.dev, phase="failed",
                  detail=f"{big_d.dev}: the drive was removed")
    assert not run.of("phase", device=big_d.dev, phase="done")
    assert run.files[big_d.remove_attr] in (b"", None), "a removed drive was powered off"
    assert run.summary["ok"] is False


@needs_testbed
@pytest.mark.umockdev
def test_no_power_off_keeps_the_drive_on_and_the_same_stick_reinserted_is_new(
        tmp_path: Path) -> None:
    image, data = image_file(tmp_path, 2 * MiB)
    run = watch(tmp_path, [str(image), "--yes", "--count", "2", "--no-power-off"],
                [WATCHING, {"add": C.description}, result_of(C),
                 {"remove": C.unplug}, {"wait": {"event": "drive_removed", "device": C.dev}},
                 {"add": C.description}, result_of(C)],
                read=(C.dev, C.remove_attr))

    assert run.rc == 0, run.stderr
    assert run.files[C.remove_attr] == b""
    assert not run.of("phase", phase="done", detail="powered off")
    assert len(run.of("drive_added", device=C.dev)) == 2
    assert [r["status"] for r in run.summary["results"]] == ["ok", "ok"]
    assert (run.files[C.dev] or b"")[: len(data)] == data


@needs_testbed
@pytest.mark.umockdev
def test_a_card_inserted_into_a_reader_is_a_new_drive(tmp_path: Path) -> None:
    """The reader was there before watching (left alone, no medium); its card arrives with a
    "change" uevent and is written."""
    image, data = image_file(tmp_path, 1 * MiB)
    reader = ("/sys/devices/pci0000:00/0000:00:14.0/usb1/1-4/1-4:1.0/host9/target9:0:0/"
              "9:0:0:0/block/sdf")
    run = watch(tmp_path, [str(image), "--yes", "--count", "1", "--no-power-off"],
                [WATCHING, {"change": reader, "attributes": {"size": str(64 * MiB // 512)}},
                 result_of(Stick("f", 4))],
                present=(fixture("usb-reader-empty.umockdev"),), read=("/dev/sdf",))
    assert run.rc == 0, run.stderr
    (added,) = run.of("drive_added", device="/dev/sdf")
    assert added["eligible"] is True and added["size"] == 64 * MiB
    assert (run.files["/dev/sdf"] or b"")[: len(data)] == data


READER = ("/sys/devices/pci0000:00/0000:00:14.0/usb1/1-4/1-4:1.0/host9/target9:0:0/"
          "9:0:0:0/block/sdf")


def _card_swapped_mid_write(tmp_path: Path, swap: list[dict[str, Any]]) -> tuple[Any, bytes]:
    """Card A in the reader, written from a crawling image; ``swap`` (uevents) once it is being
    written; then A's failed result and B's ok one awaited.  A ends "removed", B is written."""
    data = os.urandom(8 * MiB + 512)
    card = {"size": str(64 * MiB // 512), "diskseq": "11"}
    with faulty_files() as made:
        image = FaultyFile(len(data), content=data, faults={"crawl": (0, 2 * MiB)})
        made.append(image)
        run = watch(tmp_path, [str(image.file), "--yes", "--force", "--count", "2",
                               "--no-power-off"],
                    [WATCHING, {"change": READER, "attributes": card},
                     {"wait": {"event": "progress", "device": "/dev/sdf", "phase": "writing"}},
                     *swap,
                     {"wait": {"event": "result", "device": "/dev/sdf", "status": "failed"}},
                     {"wait": {"event": "result", "device": "/dev/sdf", "status": "ok"}}],
                    present=(fixture("usb-reader-empty.umockdev"),), read=("/dev/sdf",),
                    timeout=60)
    assert run.rc == 1, run.stderr
    first, second = run.summary["results"]
    assert (first["status"], first["cause"]) == ("failed", "removed")
    assert second["status"] == "ok" and second["verified"] is True
    assert (run.files["/dev/sdf"] or b"")[: len(data)] == data
    return run, data


@needs_testbed
@pytest.mark.umockdev
def test_a_card_swapped_while_the_pulled_one_is_ending_is_written_after_it(
        tmp_path: Path) -> None:
    """Card A pulled mid-write, card B in at once (the two "change" uevents back to back):
    A's job is still ending when B arrives, so B waits for it (the old job may still hold the
    device), then is announced and written like any card."""
    card = {"size": str(64 * MiB // 512), "diskseq": "11"}
    run, _ = _card_swapped_mid_write(tmp_path, [
        {"change": READER, "attributes": {"size": "0"}},
        {"change": READER, "attributes": card}])
    kinds = [(e["event"], e.get("status")) for e in run.events
             if e.get("device") == "/dev/sdf" and e["event"] in ("drive_added", "result")]
    assert kinds == [("drive_added", None), ("result", "failed"), ("drive_added", None),
                     ("result", "ok")]


@needs_testbed
@pytest.mark.umockdev
def test_a_card_swapped_quicker_than_the_media_poll_is_a_new_drive(tmp_path: Path) -> None:
    """Card A written, then swapped for card B between two of the kernel's media polls: one
    "change" uevent, the same size, no empty reader in between, but a new diskseq.  B is
    written (before: never, and its slot said A's "done: pull me")."""
    image, data = image_file(tmp_path, 1 * MiB)
    reader = ("/sys/devices/pci0000:00/0000:00:14.0/usb1/1-4/1-4:1.0/host9/target9:0:0/"
              "9:0:0:0/block/sdf")
    size = str(64 * MiB // 512)
    run = watch(tmp_path, [str(image), "--yes", "--count", "2", "--no-power-off"],
                [WATCHING, {"change": reader, "attributes": {"size": size, "diskseq": "11"}},
                 {"wait": {"event": "result", "device": "/dev/sdf", "status": "ok"}},
                 {"change": reader, "attributes": {"size": size, "diskseq": "12"}},
                 {"wait": {"event": "summary"}}],
                present=(fixture("usb-reader-empty.umockdev"),), read=("/dev/sdf",),
                timeout=60)
    assert run.rc == 0, run.stderr
    kinds = [(e["event"], e.get("status")) for e in run.events
             if e.get("device") == "/dev/sdf" and e["event"] in ("drive_added", "result")]
    assert kinds == [("drive_added", None), ("result", "ok"), ("drive_added", None),
                     ("result", "ok")], kinds
    assert (run.files["/dev/sdf"] or b"")[: len(data)] == data


@needs_testbed
@pytest.mark.umockdev
def test_a_card_swapped_mid_write_in_one_change_fails_the_first_and_writes_the_second(
        tmp_path: Path) -> None:
    """The same swap quicker than the media poll, while card A is being written: one "change"
    with a new diskseq.  A ends "removed" (its job must not go on writing B as if it were A),
    then B is written."""
    _card_swapped_mid_write(tmp_path, [
        {"change": READER, "attributes": {"size": str(64 * MiB // 512), "diskseq": "12"}}])


@needs_testbed
@pytest.mark.umockdev
def test_a_stick_plugged_in_after_the_image_s_share_hung_does_not_hang_the_session(
        tmp_path: Path) -> None:
    """The image on a FUSE share whose daemon stops once watching: each stick that arrived
    had the image's storage looked up again (stat() of the image), which waited for the share
    for good, Ctrl-C unheard.  Now where the image lies is looked at once: the stick is
    announced, and Ctrl-C ends the session."""
    data = os.urandom(2 * MiB)
    with faulty_files() as made:
        image = FaultyFile(len(data), content=data, attr_timeout=0)  # every stat asks it
        made.append(image)
        try:
            run = watch(tmp_path, [str(image.file), "--yes", "--force", "--no-power-off"],
                        [WATCHING, {"kill": image.pid, "with": int(signal.SIGSTOP)},
                         {"add": C.description},
                         {"wait": {"event": "drive_added", "device": C.dev}},
                         {"signal": int(signal.SIGINT)}], timeout=30)
        finally:
            os.kill(image.pid, signal.SIGCONT)
    assert run.rc == 130, run.stderr
    (added,) = run.of("drive_added", device=C.dev)
    assert added["eligible"] is True, added


@needs_testbed
@pytest.mark.umockdev
def test_include_present_writes_drives_plugged_in_before(tmp_path: Path) -> None:
    image, data = image_file(tmp_path, 1 * MiB)
    run = watch(tmp_path, [str(image), "--yes", "--count", "1", "--include-present"],
                [WATCHING, result_of(B)], present=(B.description,), read=(B.dev,))
    assert run.rc == 0, run.stderr
    assert (run.files[B.dev] or b"")[: len(data)] == data
    assert list(run.results()) == [B.dev]


@needs_testbed
@pytest.mark.umockdev
def test_compressed_image_is_decompressed_once_to_a_private_copy(tmp_path: Path) -> None:
    raw = os.urandom(2 * MiB + 100)
    image = tmp_path / "image.img.gz"
    image.write_bytes(gzip.compress(raw, compresslevel=1))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run = watch(tmp_path, [str(image), "--yes", "--count", "2"],
                [WATCHING, {"add": C.description}, {"add": D.description}],
                read=(C.dev, D.dev), env={"TMPDIR": str(scratch)})
    assert run.rc == 0, run.stderr
    assert len(run.of("phase", device=None, phase="decompressing")) == 1
    for stick in (C, D):
        assert (run.files[stick.dev] or b"")[: len(raw)] == raw
    assert list(scratch.iterdir()) == [], "the temporary copy was left behind"


@needs_testbed
@pytest.mark.umockdev
@pytest.mark.parametrize("how", ["ctrl-c", "stall"])
def test_a_compressed_image_whose_share_hangs_while_it_is_decompressed_ends_on_time(
        tmp_path: Path, how: str) -> None:
    """The image's share stops answering while its raw copy is made: the decompression read
    it on the session's own thread, so neither Ctrl-C nor a stall ended the session.  Now
    Ctrl-C ends it (130), and a stall is a refusal naming the image (2), the summary out while
    the share still hangs (the process itself ends once the share's read returns)."""
    packed = gzip.compress(os.urandom(16 * MiB), compresslevel=1)
    with faulty_files() as made:
        image = FaultyFile(len(packed), content=packed, faults={"crawl": (0, 2 * MiB)})
        made.append(image)
        stop = [{"signal": int(signal.SIGINT)}] if how == "ctrl-c" else []
        try:  # the share answers again once the summary is out: the process can then end
            run = watch(tmp_path, [str(image.file), "--yes", "--stall-timeout", "3"],
                        [{"wait": {"event": "progress", "phase": "decompressing"}},
                         {"kill": image.pid, "with": int(signal.SIGSTOP)}, *stop,
                         {"wait": {"event": "summary"}},
                         {"kill": image.pid, "with": int(signal.SIGCONT)}], timeout=30)
        finally:
            os.kill(image.pid, signal.SIGCONT)
    if how == "ctrl-c":
        assert run.rc == 130, run.stderr
    else:
        assert run.rc == 2, run.stderr
        assert (f"{image.file} stopped answering while it was decompressed: no progress for 3 s"
                in run.stderr), run.stderr
    assert run.summary["ok"] is False and run.summary["results"] == []


@needs_testbed
@pytest.mark.umockdev
def test_a_compressed_image_changed_after_its_copy_was_made_changes_no_stick(
        tmp_path: Path) -> None:
    """Every stick is written from the copy decompressed at the start: the original changing
    afterwards changes no stick, and fails none."""
    raw = os.urandom(2 * MiB + 100)
    image = tmp_path / "image.img.gz"
    image.write_bytes(gzip.compress(raw, compresslevel=1))
    run = watch(tmp_path, [str(image), "--yes", "--count", "2"],
                [WATCHING, {"add": C.description}, result_of(C),
                 {"flip": str(image), "offset": 1000}, {"add": D.description}, result_of(D)],
                read=(C.dev, D.dev))
    assert run.rc == 0, run.stderr
    assert {r["status"] for r in run.summary["results"]} == {"ok"}
    for stick in (C, D):
        assert (run.files[stick.dev] or b"")[: len(raw)] == raw


@needs_testbed
@pytest.mark.umockdev
@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_cancels_the_drive_in_flight(tmp_path: Path, sig: int, status: int) -> None:
    image, _ = image_file(tmp_path, 64 * MiB)
    big = Stick("c", 3, 128 * MiB)
    run = watch(tmp_path, [str(image), "--yes"],
                [WATCHING, {"add": big.description},
                 {"wait": {"event": "progress", "device": big.dev, "phase": "writing"}},
                 {"signal": int(sig)}],
                read=(big.remove_attr,))
    assert run.rc == status, run.stderr
    (result,) = run.summary["results"]
    assert result["status"] == "cancelled"
    assert run.files[big.remove_attr] == b""
    again = "Ctrl-C again" if sig == signal.SIGINT else "another SIGTERM"
    assert f"stopping every drive ({again} to quit at once)" in run.stderr


@needs_testbed
@pytest.mark.umockdev
def test_a_power_off_that_hangs_does_not_hold_the_session_past_ctrl_c(tmp_path: Path) -> None:
    """A stick written and verified that stops answering when it is powered off (here its
    USB device's ``remove`` never takes the write): one Ctrl-C ends the session, the drive
    stays ok, and the operator is told it was not powered off."""
    data = os.urandom(8 * MiB + 512)  # a crawl of buckets: the trap is set mid-write
    with faulty_files() as made:
        image = FaultyFile(len(data), content=data, faults={"crawl": (0, 2 * MiB)})
        made.append(image)
        run = watch(tmp_path, [str(image.file), "--yes", "--force"],
                    [WATCHING, {"add": C.description},
                     {"wait": {"event": "progress", "device": C.dev, "phase": "writing"}},
                     {"fifo": C.remove_attr}, result_of(C), {"signal": int(signal.SIGINT)}],
                    read=(C.dev,), timeout=30)
    assert run.rc == 0, run.stderr
    (result,) = run.summary["results"]
    assert (result["status"], result["verified"]) == ("ok", True)
    assert (run.files[C.dev] or b"")[: len(data)] == data
    assert not run.of("phase", device=C.dev, phase="done", detail="powered off")
    assert {"event": "note", "text": f"{C.dev}: done, but not powered off (stopped while it "
            "was being powered off); it can be pulled"} in run.events
    assert "quit at once" in run.stderr  # a drive was still in hand: the first Ctrl-C


def test_a_call_that_hangs_is_given_up_after_its_limit_or_at_a_stop(tmp_path: Path) -> None:
    """How a power-off is bounded: the call (an open that never returns) is left on its
    thread, and the caller hears why at the limit, or at once when told to stop."""
    fifo = tmp_path / "remove"
    os.mkfifo(fifo)

    def hangs() -> str | None:
        with open(fifo, "w") as f:  # nobody reads: blocks
            f.write("1")
        return None

    assert bounded(hangs, cancel=lambda: False, limit=0.3, name="t") == \
        "it did not answer for 0.3 s"
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    assert bounded(hangs, cancel=stop.is_set, limit=None, name="t") == STOPPED
    assert bounded(lambda: "no USB device", cancel=lambda: False, limit=0.3,
                   name="t") == "no USB device"
    assert bounded(lambda: None, cancel=lambda: False, limit=0.3, name="t") is None
    with open(fifo, "rb"):  # let the workers' opens return
        pass


@needs_testbed
@pytest.mark.umockdev
def test_a_signal_while_idle_ends_the_session_with_the_drives_status(tmp_path: Path) -> None:
    image, _ = image_file(tmp_path, 1 * MiB)
    run = watch(tmp_path, [str(image), "--yes"],
                [WATCHING, {"add": C.description}, result_of(C),
                 {"wait": {"event": "phase", "device": C.dev, "detail": "powered off"}},
                 {"signal": int(signal.SIGTERM)}])
    assert run.rc == 0, run.stderr
    assert [r["status"] for r in run.summary["results"]] == ["ok"]
    assert "SIGTERM: ending the session (no drive is being written)" in run.stderr
    assert "stopping every drive" not in run.stderr


@needs_testbed
@pytest.mark.umockdev
def test_a_session_ended_with_no_drive_is_ok_and_says_so(tmp_path: Path) -> None:
    # Exit 0 and "ok": true agree: a script reading either gets the same answer.
    image, _ = image_file(tmp_path, 1 * MiB)
    run = watch(tmp_path, [str(image), "--yes"], [WATCHING, {"signal": int(signal.SIGINT)}])
    assert run.rc == 0, run.stderr
    assert run.summary == {"event": "summary", "ok": True, "results": []}


@needs_testbed
@pytest.mark.umockdev
def test_plain_output_without_json(tmp_path: Path) -> None:
    image, _ = image_file(tmp_path, 1 * MiB)
    run = watch(tmp_path, [str(image), "--yes", "--count", "1"],
                [{"wait_line": "watching"}, {"add": C.description},
                 {"add": fixture("sata.umockdev")}],
                as_json=False)
    assert run.rc == 0, run.stderr
    text = "\n".join(run.stdout)
    assert f"{C.dev}: added (SanDisk Cruzer Blade, 64 MiB, port 1-3)" in text
    assert f"{C.dev}: ok" in text
    assert f"{C.dev}: powered off" in text
    assert "done: 1 of 1 drives ok" in text


# ----------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.umockdev
@pytest.mark.skipif(shutil.which("umockdev-run") is None, reason="umockdev-run is not installed")
def test_watch_without_yes_refuses_and_writes_nothing(tmp_path: Path) -> None:
    image, _ = image_file(tmp_path, 1 * MiB)
    cmd = " ".join(f"'{part}'" for part in popsicle_cmd())
    result = subprocess.run(
        ["umockdev-run", "-d", str(FIXTURES / "cli-usb-stick.umockdev"), "--", "sh", "-c",
         f'{cmd} watch --include-present --json "$1"; status=$?; wc -c < /dev/sdb; '
         'exit $status', "sh", str(image)],
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--yes" in result.stderr
    lines = result.stdout.splitlines()
    assert json.loads(lines[-2]) == {"event": "summary", "ok": False, "results": []}
    assert lines[-1].strip() == "0", "the stick was written"


def test_watch_refuses_a_missing_image_and_a_bad_checksum(tmp_path: Path) -> None:
    missing = subprocess.run([*popsicle_cmd(), "watch", "--yes", str(tmp_path / "nope.img")],
                             capture_output=True, text=True, timeout=30, check=False,
                             stdin=subprocess.DEVNULL)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    image, _ = image_file(tmp_path, 1 * MiB)
    bad = subprocess.run([*popsicle_cmd(), "watch", "--yes", "--sha256", "0" * 64, str(image)],
                         capture_output=True, text=True, timeout=30, check=False,
                         stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and "checksum mismatch" in bad.stderr


# ----------------------------------------------------------------------------------------------
# Views


def _feed(view: Any, stream: list[Any]) -> None:
    for event in stream:
        view.handle(event)


SESSION = [
    events.Watching(),
    events.DriveAdded("/dev/sdc", "SanDisk Cruzer Blade", 64 * MiB, True),
    events.DriveAdded("/dev/sda", "Samsung SSD", 500 * 10**9, False, "not a USB or SD drive"),
    events.Phase("/dev/sdc", events.Step.WRITING),
    events.Progress("/dev/sdc", events.Step.WRITING, MiB, 2 * MiB),
    events.DriveAdded("/dev/sdd", "SanDisk Cruzer Blade", 64 * MiB, True),
    events.Phase("/dev/sdd", events.Step.WRITING),
    # A stick pulled mid-write, in the session's order (seen in a real run): the removal
    # first, then its job's end.
    events.DriveRemoved("/dev/sdd"),
    events.Phase("/dev/sdd", events.Step.FAILED, "/dev/sdd: the drive was removed",
                 events.Cause.REMOVED),
    events.Result(events.DriveResult("/dev/sdd", events.Status.FAILED, MiB,
                                      "/dev/sdd: the drive was removed",
                                      cause=events.Cause.REMOVED)),
    events.Phase("/dev/sdc", events.Step.DONE),
    events.Result(events.DriveResult("/dev/sdc", events.Status.OK, 2 * MiB, verified=True)),
    events.Phase("/dev/sdc", events.Step.DONE, events.POWERED_OFF),
]


def _screen(view: WatchView, width: int = 160) -> str:
    screen = io.StringIO()
    Console(file=screen, width=width, color_system=None).print(view)
    return screen.getvalue()


def _failed_in_place(device: str) -> list[events.WatchEvent]:
    """A stick that fails while plugged in (an I/O error): it is there to be pulled."""
    why = f"{device}: write error at 1 MiB: Input/output error"
    return [events.DriveAdded(device, "SanDisk Cruzer Blade", 64 * MiB, True),
            events.Phase(device, events.Step.WRITING),
            events.Phase(device, events.Step.FAILED, why, events.Cause.IO_ERROR),
            events.Result(events.DriveResult(device, events.Status.FAILED, MiB, why,
                                              cause=events.Cause.IO_ERROR))]


def test_watch_view_rows_header_and_next_step() -> None:
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=False, color_system=None)
    view = WatchView(console, "/tmp/image.img", 2 * MiB, count=4)
    _feed(view, SESSION)
    text = _screen(view)
    assert "/tmp/image.img" in text
    assert "done 1" in text and "failed 1" in text and "in progress 0" in text
    assert "done, powered off: pull it" in text
    assert "failed: the drive was removed" in text  # pulled already: nothing to pull
    assert "ignored: not a USB or SD drive" in text
    assert "Pull" not in text
    assert "-> Plug in the next drive (2 more to go)" in text
    _feed(view, _failed_in_place("/dev/sde"))
    text = _screen(view)
    assert "failed: pull it (write error at 1 MiB: Input/output error)" in text
    assert "Pull the failed drive (/dev/sde); plug in the next drive (1 more to go)" in text
    view.handle(events.DriveRemoved("/dev/sde"))
    assert "-> Plug in the next drive (1 more to go)" in _screen(view)
    view.handle(events.Summary((events.DriveResult("/dev/sdc", events.Status.OK, 2 * MiB),)))
    assert "done: 1 of 1 drives ok" in out.getvalue()


def test_watch_view_never_says_to_pull_a_drive_already_pulled_or_one_being_written() -> None:
    """The session says a stick pulled mid-write is gone before its job ends (the order of a
    real run): it is not to be pulled, and the stick the kernel names after it, being
    written, even less.  A failed stick whose removal was not heard is off the list once
    another drive is added under its name."""
    view = WatchView(Console(file=io.StringIO(), width=160, color_system=None),
                     "/tmp/image.img", 2 * MiB, count=6)
    _feed(view, SESSION)
    assert "Pull" not in _screen(view)
    _feed(view, [events.DriveAdded("/dev/sdd", "SanDisk Cruzer Blade", 64 * MiB, True),
                 events.Phase("/dev/sdd", events.Step.WRITING),
                 events.Progress("/dev/sdd", events.Step.WRITING, MiB, 2 * MiB)])
    text = _screen(view)
    assert "Pull" not in text
    assert "-> Plug in the next drive (3 more to go)" in text
    # A failed stick still in its port, then another drive under its name.
    _feed(view, _failed_in_place("/dev/sde"))
    assert "Pull the failed drive (/dev/sde)" in _screen(view)
    _feed(view, [events.DriveAdded("/dev/sde", "SanDisk Cruzer Blade", 64 * MiB, True),
                 events.Phase("/dev/sde", events.Step.WRITING)])
    text = _screen(view)
    assert "Pull" not in text
    assert "-> Plug in the next drive (1 more to go)" in text


@pytest.mark.parametrize("width", [80, 120])
def test_watch_view_fits_the_terminal(width: int) -> None:
    """Every row keeps its name, bar and state; the detail goes under it when narrow."""
    view = WatchView(Console(file=io.StringIO(), width=width, color_system=None),
                     "/var/lib/images/raspios-bookworm-arm64-lite.img", 2 * MiB, count=3)
    _feed(view, SESSION)
    screen = io.StringIO()
    Console(file=screen, width=width, color_system=None).print(view)
    lines = screen.getvalue().splitlines()
    assert all(len(line) <= width for line in lines), lines
    rows = {d: next(line for line in lines if line.startswith(d))
            for d in ("/dev/sdc", "/dev/sda", "/dev/sdd")}
    assert "100%" in rows["/dev/sdc"] and "done" in rows["/dev/sdc"]
    assert "failed" in rows["/dev/sdd"] and "%" in rows["/dev/sdd"]
    assert "ignored" in rows["/dev/sda"] and "%" not in rows["/dev/sda"]
    text = "\n".join(lines)
    assert "the drive was removed" in text and "not a USB or SD drive" in text


def test_plain_view_says_what_happened_to_each_drive() -> None:
    out = io.StringIO()
    view = PlainView(out)
    _feed(view, [*SESSION, events.DriveRemoved("/dev/sdc"), events.Summary()])
    lines = out.getvalue().splitlines()
    assert "watching: plug in the drives to write (Ctrl-C to stop)" in lines
    assert "/dev/sdc: added (SanDisk Cruzer Blade, 64 MiB)" in lines
    assert "/dev/sda: ignored (Samsung SSD, 465.7 GiB): not a USB or SD drive" in lines
    assert "/dev/sdd: failed: the drive was removed" in lines
    assert "/dev/sdc: powered off; it can be pulled" in lines
    assert "/dev/sdc: removed" in lines
    assert lines[-1] == "no drive was written"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
