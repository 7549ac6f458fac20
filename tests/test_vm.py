"""The VM tier: the CLI inside a QEMU guest, against the kernel's own USB stack.

One guest is booted for the whole module (tests/vm/guest.py): Debian's kernel on the host's
root, systemd-udevd running, an xHCI controller with a hub, USB sticks (one behind the hub, two
sharing a serial), a card reader with two LUNs, and a SATA and a virtio disk that must never be
offered.  Drives are plugged and pulled with QMP, so the guest kernel sees a real hotplug, and
every claim is checked in the host's image files that back the emulated drives.

Run alone with ``tests/vm/run``; it is part of the default suite (marker ``vm``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vm.guest import Guest, MiB, booted, poll
from vm.record import RECORDINGS, merge, record_all

pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("vm")]

IMAGE_SIZE = 10 * MiB + 12345  # more than one bucket, not a multiple of 512
STICKS = ("hubstick", "stick", "twin", "lun0", "lun1")  # what --all-usb must take
INTERNAL = ("sata", "virtio")  # what it must never take
#: Where the guest kernel puts each drive: (USB port, SCSI LUN).  QEMU's hub is a full-speed
#: hub on the USB 2 root hub (bus 1); the sticks and the reader plugged into the controller
#: itself enumerate as SuperSpeed devices on bus 2.
PORTS = {"hubstick": ("1-1.1", 0), "stick": ("2-2", 0), "twin": ("2-4", 0),
         "lun0": ("2-3", 0), "lun1": ("2-3", 1)}


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the VM tier needs root (QEMU, apt-get download into /var/cache)"
    for tool in ("qemu-system-x86_64", "apt-get", "dpkg-deb", "depmod"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (see .ci/run)"
    return None


@pytest.fixture(scope="module")
def vm() -> Iterator[Guest]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    with booted() as guest:
        guest.settle()
        yield guest


@pytest.fixture(scope="module")
def image(vm: Guest) -> tuple[bytes, str]:
    """Random bytes in the share: (the bytes, the guest's path to them)."""
    data = os.urandom(IMAGE_SIZE)
    return data, vm.put("image.img", data)


@pytest.fixture(scope="module")
def listed(vm: Guest) -> dict[str, dict[str, Any]]:
    """``list --json`` in the guest, by path (run once: each CLI start costs seconds in TCG)."""
    result = vm.popsicle("list", "--json")
    assert result.rc == 0, result.stderr
    return {d["path"]: d for d in json.loads(result.stdout)}


@pytest.fixture(scope="module")
def listed_all(vm: Guest) -> dict[str, dict[str, Any]]:
    """``list --all --json`` in the guest, by path."""
    result = vm.popsicle("list", "--all", "--json")
    assert result.rc == 0, result.stderr
    return {d["path"]: d for d in json.loads(result.stdout)}


def guest_drives(vm: Guest) -> dict[str, str]:
    """Disk id -> the guest's /dev path, matched through the kernel's sysfs path (port, LUN)."""
    out = vm.sh("for d in /sys/block/sd* /sys/block/vd*; do echo $d $(readlink -f $d); done")
    by_port = {port_lun: disk for disk, port_lun in PORTS.items()}
    found: dict[str, str] = {}
    for line in out.splitlines():
        name, real = line.split()[0].rsplit("/", 1)[1], line.split()[1]
        parts = real.split("/")
        if "/ata" in real:
            found["sata"] = f"/dev/{name}"
        elif "/virtio" in real:
            found["virtio"] = f"/dev/{name}"
        elif "/usb" in real:
            port = next(p for p in reversed(parts) if ":" not in p and "-" in p
                        and not p.startswith("target"))
            lun = int(parts[parts.index("block") - 1].rsplit(":", 1)[1])
            if (port, lun) in by_port:
                found[by_port[(port, lun)]] = f"/dev/{name}"
    return found


def serial_of(vm: Guest, serial: str) -> list[str]:
    """The guest's disks whose udev ID_SERIAL_SHORT is ``serial``."""
    return sorted(f"/dev/{name}" for name, s in vm.block_devices().items() if s == serial)


def results(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    summary = [e for e in events if e["event"] == "summary"]
    assert len(summary) == 1, events[-5:]
    return {r["device"]: r for r in summary[0]["results"]}


def zero_sticks(vm: Guest) -> None:
    """Blank every drive's host file, so each test sees only its own writes."""
    for disk in vm.disks.values():
        with open(disk.file, "r+b") as f:
            f.write(b"\0" * (IMAGE_SIZE + MiB))


def assert_holds(vm: Guest, disk_id: str, data: bytes) -> None:
    disk = vm.disks[disk_id]
    assert disk.read(len(data)) == data, f"{disk_id} does not hold the image"
    assert disk.read(MiB, len(data)) == b"\0" * MiB, f"{disk_id}: written past the image"


def assert_untouched(vm: Guest, disk_id: str) -> None:
    disk = vm.disks[disk_id]
    assert disk.read(disk.size) == b"\0" * disk.size, f"{disk_id} was written"


# ------------------------------------------------------------------------------------------
# Discovery


def test_list_json_offers_usb_sticks_and_reader_luns_never_the_internal_disks(
        vm: Guest, listed: dict[str, dict[str, Any]]) -> None:
    where = guest_drives(vm)
    assert set(where) == set(STICKS) | set(INTERNAL), where
    assert set(listed) == {where[s] for s in STICKS}
    for disk_id in STICKS:
        drive = listed[where[disk_id]]
        assert (drive["bus"], drive["removable"], drive["eligible"]) == ("usb", True, True)
        assert drive["serial"] == vm.disks[disk_id].serial
        assert drive["size"] == vm.disks[disk_id].size
    # Two sticks sharing a serial are two drives; so are the reader's two LUNs.
    assert listed[where["stick"]]["serial"] == listed[where["twin"]]["serial"] == "DUP-0001"
    assert listed[where["lun0"]]["serial"] == listed[where["lun1"]]["serial"] == "READER-0001"


def test_list_all_shows_the_internal_disks_as_not_eligible(
        vm: Guest, listed_all: dict[str, dict[str, Any]]) -> None:
    where = guest_drives(vm)
    listed = listed_all
    sata, virtio = listed[where["sata"]], listed[where["virtio"]]
    assert (sata["bus"], sata["removable"], sata["eligible"]) == ("ata", False, False)
    assert (virtio["bus"], virtio["removable"], virtio["eligible"]) == ("virtio", False, False)
    assert sata["reason"] == virtio["reason"] == "not a USB or SD drive"
    assert {listed[where[s]]["eligible"] for s in STICKS} == {True}


def test_list_json_gives_each_drive_its_usb_port(vm: Guest,
                                                listed: dict[str, dict[str, Any]]) -> None:
    where = guest_drives(vm)
    for disk_id in STICKS:
        assert listed[where[disk_id]]["port_path"] == PORTS[disk_id][0]


def test_list_json_gives_each_stick_its_usb_link_speed(vm: Guest,
                                                      listed: dict[str, dict[str, Any]]) -> None:
    """The kernel's own link speeds (issue 29): full speed behind QEMU's hub, SuperSpeed on
    the controller's own ports."""
    where = guest_drives(vm)
    assert {disk_id: listed[where[disk_id]]["link_speed"] for disk_id in STICKS} == {
        "hubstick": 12, "stick": 5000, "twin": 5000, "lun0": 5000, "lun1": 5000}


def test_list_plain_names_the_sticks_and_not_the_internal_disks(vm: Guest) -> None:
    where = guest_drives(vm)
    result = vm.popsicle("list")
    assert result.rc == 0, result.stderr
    for disk_id in STICKS:
        assert where[disk_id] in result.stdout
    for disk_id in INTERNAL:
        assert where[disk_id] not in result.stdout


def test_list_says_no_for_a_stick_a_program_holds(vm: Guest) -> None:
    """``flash`` refuses a stick another program has open; ``list`` said "yes" for it."""
    node = guest_drives(vm)["twin"]
    holder = vm.spawn(["/bin/sh", "-c", f"exec sleep 600 < {node}"])
    try:
        poll(lambda: vm.sh(f"readlink /proc/{holder.pid}/fd/0 || true").strip() == node, 60,
             "the holder to open the stick")
        why = f"open in sleep (pid {holder.pid})"
        listed = vm.popsicle("list", "--json")
        assert listed.rc == 0, listed.stderr
        drive = next(d for d in json.loads(listed.stdout) if d["path"] == node)
        assert (drive["eligible"], drive["reason"]) == (False, why)
        shown = vm.popsicle("list")
        row = next(line for line in shown.stdout.splitlines() if line.startswith(node + " "))
        assert row.rstrip().endswith(f"no: {why}"), shown.stdout
    finally:
        holder.stop()


def test_list_says_no_for_a_stick_the_kernel_holds_unseen(vm: Guest) -> None:
    """A file system unmounted with ``umount -l`` while a loop device still uses a file on
    it: in no mount table, no program has the stick open, and ``flash`` refuses it; ``list``
    said "yes"."""
    node = guest_drives(vm)["twin"]
    inner = vm.sh(f"modprobe loop && mkfs.vfat {node} >/dev/null && mkdir -p /tmp/lazy"
                  f" && mount {node} /tmp/lazy"
                  " && truncate -s 1M /tmp/lazy/f && losetup -f --show -r /tmp/lazy/f"
                  " && umount -l /tmp/lazy").strip()
    try:
        listed = vm.popsicle("list", "--json")
        assert listed.rc == 0, listed.stderr
        drive = next(d for d in json.loads(listed.stdout) if d["path"] == node)
        assert drive["eligible"] is False
        assert drive["reason"] == (f"in use by {inner}, a loop device over a file on it (its "
                                   "file system is mounted nowhere: unmounted with `umount -l`"
                                   " while in use?)")
        others = [d for d in json.loads(listed.stdout) if d["path"] != node]
        assert others and all(d["eligible"] for d in others)
    finally:
        vm.sh(f"losetup -d {inner}")


# ------------------------------------------------------------------------------------------
# Flashing


def test_flash_all_usb_writes_and_verifies_exactly_the_sticks(vm: Guest,
                                                              image: tuple[bytes, str]) -> None:
    data, path = image
    zero_sticks(vm)
    where = guest_drives(vm)
    result = vm.popsicle("flash", "--all-usb", "--yes", "--json", "--bucket-size", "4M", path)
    assert result.rc == 0, result.stderr
    events = result.json_lines()
    got = results(events)
    assert set(got) == {where[s] for s in STICKS}
    for r in got.values():
        assert (r["status"], r["bytes_written"], r["error"]) == ("ok", IMAGE_SIZE, None)
    assert {e["device"] for e in events if e["event"] == "phase" and e["phase"] == "verifying"
            } == set(got)
    for disk_id in STICKS:
        assert_holds(vm, disk_id, data)
    for disk_id in INTERNAL:
        assert_untouched(vm, disk_id)


def test_a_stick_pulled_mid_write_ends_removed_while_the_others_finish(
        vm: Guest, image: tuple[bytes, str]) -> None:
    data, path = image
    zero_sticks(vm)
    victim = vm.add_stick("victim", "5", "VICTIM-0001", 48 * MiB, bps_write=1_000_000)
    try:
        node = poll(lambda: serial_of(vm, "VICTIM-0001"), 120, "the guest to see the stick")[0]
        vm.settle()
        run = vm.spawn_popsicle("flash", "--all-usb", "--yes", "--json", "--bucket-size", "4M",
                                path)
        poll(lambda: any(e["event"] == "progress" and e["device"] == node and e["bytes"] > 0
                         for e in run.json_lines()), 300, "the stick to be written")
        vm.pull("victim")
        rc = run.wait(300)
        got = results(run.json_lines())
        assert rc == 1, run.stderr()
        assert got[node]["status"] == "failed"
        assert "the drive was removed" in got[node]["error"]
        others = set(got) - {node}
        assert others == set(guest_drives(vm)[s] for s in STICKS)
        assert {got[d]["status"] for d in others} == {"ok"}
        for disk_id in STICKS:
            assert_holds(vm, disk_id, data)
        # The image's head (its first 64 KiB) is written last: the pulled stick never got it.
        assert victim.read(64 << 10) != data[: 64 << 10]
        poll(lambda: not serial_of(vm, "VICTIM-0001"), 60, "the stick to leave the guest")
    finally:
        if "victim" in vm.hot:
            vm.pull("victim")


def test_watch_flashes_a_plugged_stick_and_powers_it_off(vm: Guest,
                                                         image: tuple[bytes, str]) -> None:
    data, path = image
    run = vm.spawn_popsicle("watch", "--yes", "--json", "--count", "1", path)
    try:
        poll(lambda: any(e["event"] == "watching" for e in run.json_lines()), 300,
             "watch to start watching")
        hot = vm.add_stick("hot", "6", "HOT-0001", 32 * MiB)
        rc = run.wait(300)
        events = run.json_lines()
        assert rc == 0, (run.stderr(), events[-5:])
        assert [r["status"] for r in results(events).values()] == ["ok"]
        assert hot.read(len(data)) == data
        # Powered off: the kernel let go of the stick, though it is still plugged into QEMU.
        poll(lambda: not serial_of(vm, "HOT-0001"), 60, "the stick to be powered off")
        assert vm.sh("[ -e /sys/bus/usb/devices/2-6 ] && echo present || echo gone").strip() \
            == "gone"
    finally:
        run.stop()
        if "hot" in vm.hot:
            vm.pull("hot")


def test_a_throttled_stick_does_not_hold_the_others_back(vm: Guest,
                                                        image: tuple[bytes, str]) -> None:
    data, path = image
    zero_sticks(vm)
    where = guest_drives(vm)
    vm.throttle("stick", 1_000_000)
    try:
        # A 2 MiB ring against a 10 MiB image: the slow stick falls a ring behind and is sent
        # on alone, reading the image by position, while the others finish.
        result = vm.popsicle("flash", "--all-usb", "--yes", "--json", "--bucket-size", "1M",
                             "--buckets", "2", path)
    finally:
        vm.throttle("stick", 0)
    assert result.rc == 0, result.stderr
    got = results(result.json_lines())
    assert {r["status"] for r in got.values()} == {"ok"}
    slow = got[where["stick"]]["elapsed"]
    fast = max(got[where[s]]["elapsed"] for s in STICKS if s != "stick")
    assert slow >= IMAGE_SIZE / 1_000_000, got  # the throttle really held it
    assert fast < 0.7 * slow, got
    for disk_id in STICKS:
        assert_holds(vm, disk_id, data)


def test_an_io_error_on_the_scsi_path_fails_that_stick_only(vm: Guest,
                                                           image: tuple[bytes, str]) -> None:
    data, path = image
    zero_sticks(vm)
    vm.add_stick("bad", "7", "BAD-0001", 48 * MiB, error_sector=(6 * MiB) // 512)
    try:
        node = poll(lambda: serial_of(vm, "BAD-0001"), 120, "the guest to see the stick")[0]
        vm.settle()
        result = vm.popsicle("flash", "--all-usb", "--yes", "--json", "--bucket-size", "4M",
                             path, timeout=600)
        got = results(result.json_lines())
        assert result.rc == 1, result.stderr
        assert got[node]["status"] == "failed"
        assert "Input/output error" in got[node]["error"] or "I/O" in got[node]["error"]
        assert {got[d]["status"] for d in set(got) - {node}} == {"ok"}
        for disk_id in STICKS:
            assert_holds(vm, disk_id, data)
        # The failed drive never got its first bucket.
        assert vm.disks["bad"].read(64 << 10) != data[: 64 << 10]  # no image head on it
    finally:
        vm.pull("bad")


# ------------------------------------------------------------------------------------------
# Recorded trees: umockdev descriptions of what the real kernel showed


def test_recorded_trees_give_the_same_discovery_as_the_real_guest(
        vm: Guest, listed_all: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """What tests/vm/run --record writes, replayed by umockdev, reads as the real guest did."""
    where = guest_drives(vm)
    description = tmp_path / "recorded.umockdev"
    description.write_text(merge(list(record_all(vm, where).values())))
    real = listed_all
    mocked_run = subprocess.run(
        ["umockdev-run", "-d", str(description), "--", sys.executable, "-m", "popsicle_py",
         "list", "--all", "--json"], capture_output=True, text=True, timeout=120)
    assert mocked_run.returncode == 0, mocked_run.stderr
    mocked = {d["path"]: d for d in json.loads(mocked_run.stdout)}
    keys = ("bus", "removable", "eligible", "serial", "size", "vendor", "model", "devnum")
    recorded = [d for disks in RECORDINGS.values() for d in disks]
    assert set(mocked) == {where[d] for d in recorded}
    for disk_id in recorded:
        path = where[disk_id]
        assert {k: mocked[path][k] for k in keys} == {k: real[path][k] for k in keys}, disk_id
    # (Reasons of the internal disks may differ: on the host, / may be mounted from vda.)
    assert {mocked[where[s]]["reason"] for s in recorded if s in STICKS} == {None}


def _api(vm: Guest, url: str, token: str | None = None) -> Any:
    """GET (or, with a token, POST) ``url`` from inside the guest; the JSON it answers."""
    code = ("import json, sys, urllib.request as u\n"
            "r = u.Request(sys.argv[1], method='POST' if len(sys.argv) > 2 else 'GET',\n"
            "              headers={'Authorization': 'Bearer ' + sys.argv[2]}"
            " if len(sys.argv) > 2 else {})\n"
            "print(u.urlopen(r, timeout=30).read().decode())\n")
    result = vm.run([sys.executable, "-c", code, url, *([token] if token else [])], 60)
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def _reads(vm: Guest, device: str) -> int:
    """Sectors read from ``device`` so far (/sys/block/NAME/stat, the kernel's own count)."""
    return int(vm.sh(f"cat /sys/block/{device.rsplit('/', 1)[-1]}/stat").split()[2])


def test_the_station_follows_sticks_on_the_kernels_usb_stack(vm: Guest,
                                                             image: tuple[bytes, str]) -> None:
    """Issue 26's VM test: slots by real USB port, /api/slots follows hotplug, and identify
    raises only that stick's read counter."""
    data, path = image
    slots = vm.put("station-slots.toml",
                   b'[[slot]]\nlabel = "A"\nport = "2-6"\n\n[[slot]]\nlabel = "B"\n'
                   b'port = "2-7"\n')
    # The journal on the guest's own tmpfs: SQLite's WAL wants shared memory maps, which the
    # 9p share does not give.
    state = "/run/popsicle-station"
    vm.sh(f"rm -rf {state} && mkdir -p {state}")
    run = vm.spawn_popsicle("station", path, "--yes", "--json", "--no-power-off", "--slots",
                            slots, "--listen", "127.0.0.1:0", "--journal",
                            f"{state}/station.sqlite", "--token-file", f"{state}/station.token")
    try:
        def url() -> str | None:
            lines = run.json_lines()
            for e in lines:
                if e["event"] == "note" and e["text"].startswith("station "):
                    return str(e["text"].split(": ", 1)[1])
            assert not any(e["event"] == "summary" for e in lines), run.stderr()
            return None

        base = poll(url, 300, "the station's URL").rstrip("/")
        poll(lambda: any(e["event"] == "watching" for e in run.json_lines()), 300,
             "the station to watch")
        token = vm.sh(f"cat {state}/station.token").strip()
        assert [s["state"] for s in _api(vm, base + "/api/slots")["slots"]] == ["empty", "empty"]
        a = vm.add_stick("slota", "6", "SLOT-A-01", 32 * MiB)
        b = vm.add_stick("slotb", "7", "SLOT-B-01", 32 * MiB)

        seen: list[Any] = []

        def done() -> list[dict[str, Any]] | None:
            tiles = _api(vm, base + "/api/slots")["slots"]
            seen[:] = [(t["state"], t["why"]) for t in tiles]
            return tiles if [t["state"] for t in tiles] == ["done", "done"] else None

        try:
            tiles = poll(done, 600, "both slots done")
        except Exception:
            raise AssertionError((seen, run.json_lines()[-8:], run.stderr()[-2000:])) from None
        assert a.read(len(data)) == data and b.read(len(data)) == data
        dev_a, dev_b = tiles[0]["device"], tiles[1]["device"]
        assert dev_a and dev_b and dev_a != dev_b
        before_a, before_b = _reads(vm, dev_a), _reads(vm, dev_b)
        answer = _api(vm, base + "/api/slots/A/identify", token)
        assert answer["reading"] is True
        poll(lambda: _reads(vm, dev_a) > before_a, 60, "slot A's stick to be read")
        poll(lambda: not _api(vm, base + "/api/slots")["slots"][0]["identify"], 60,
             "identify to end")
        assert _reads(vm, dev_b) == before_b, "identify read the other stick too"
        _api(vm, base + "/api/stop", token)
        assert run.wait(120) == 0, run.stderr()
    finally:
        run.stop()
        for disk in ("slota", "slotb"):
            if disk in vm.hot:
                vm.pull(disk)
