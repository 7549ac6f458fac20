"""Tests for popsicle_py.drives: pure rules, umockdev discovery, loop devices as targets."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loopdev import (
    HAVE_LOSETUP,
    HAVE_UMOCKDEV,
    IS_ROOT,
    MiB,
    in_testbed,
    loop_device,
    mounted_ext4,
)

from popsicle_py import drives, sysfs
from popsicle_py.drives import (
    Drive,
    Mount,
    Swap,
    SystemFacts,
    TargetError,
    drive_for_path,
    eligibility,
    explain,
    still_same,
    system_reason,
)
from popsicle_py.units import format_size

needs_umockdev = pytest.mark.skipif(not HAVE_UMOCKDEV, reason="umockdev-run is not installed")
needs_loop = pytest.mark.skipif(not (IS_ROOT and HAVE_LOSETUP),
                                reason="loop devices need root and losetup")

SDA = os.makedev(8, 0)
SDA1 = os.makedev(8, 1)
SDAA = os.makedev(65, 160)
SDAA1 = os.makedev(65, 161)


def make_drive(**changes: object) -> Drive:
    """A plain eligible USB stick, changed as a test needs."""
    base = Drive(path="/dev/sdb", name="sdb", devnum=os.makedev(8, 16), vendor="SanDisk",
                 model="Cruzer Blade", serial="4C53", size=16 * 10**9, logical_block_size=512,
                 bus="usb", removable=True, read_only=False, has_media=True,
                 partitions=("/dev/sdb1",), mountpoints=(), swap=False, eligible=True,
                 reason=None, system=False)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Pure rules


def test_sda_is_not_matched_by_a_mount_of_sdaa1() -> None:
    """Device numbers decide, never path prefixes: /dev/sdaa1 on / says nothing about sda."""
    facts = SystemFacts(mounts=(Mount("/dev/sdaa1", "/", frozenset({SDAA1, SDAA})),))
    assert system_reason(SDA, facts) is None
    assert system_reason(SDAA, facts) == "system drive (/ is mounted from it)"


def test_mount_matches_by_number_whatever_its_name() -> None:
    facts = SystemFacts(mounts=(Mount("/dev/disk/by-uuid/x", "/boot", frozenset({SDA1, SDA})),))
    assert system_reason(SDA, facts) == "system drive (/boot is mounted from it)"


def test_root_wins_over_other_system_mounts_and_plain_mounts_are_not_system() -> None:
    facts = SystemFacts(mounts=(Mount("/dev/sda2", "/home", frozenset({SDA})),
                                Mount("/dev/sda1", "/", frozenset({SDA})),
                                Mount("/dev/sdb1", "/media/stick", frozenset({SDAA}))))
    assert system_reason(SDA, facts) == "system drive (/ is mounted from it)"
    assert system_reason(SDAA, facts) is None
    assert drives.mountpoints_of(SDA, facts.mounts) == ("/home", "/")


def test_swap_and_image_make_a_system_drive() -> None:
    assert system_reason(SDA, SystemFacts(swaps=(Swap("/dev/sda3", frozenset({SDA})),))) \
        == "active swap"
    assert system_reason(SDA, SystemFacts(image_devnums=frozenset({SDA}))) == "holds the image"
    assert system_reason(SDA, SystemFacts(image_inode=(5, 7)), backing_inode=(5, 7)) \
        == "holds the image"


@pytest.mark.parametrize(("bus", "size", "ro", "system", "explicit", "expected"), [
    ("usb", 10, False, None, False, (True, None)),
    ("sd", 10, False, None, False, (True, None)),
    ("usb", 0, False, None, False, (False, "no medium")),
    ("usb", 10, True, None, False, (False, "read-only")),
    ("usb", 10, True, "system drive (/ is mounted from it)", False,
     (False, "system drive (/ is mounted from it)")),
    ("nvme", 10, False, None, False, (False, "not a USB or SD drive")),
    ("loop", 10, False, None, False, (False, "not a USB or SD drive")),
    ("loop", 10, False, None, True, (True, None)),
    ("loop", 10, True, None, True, (False, "read-only")),
    ("ata", 10, False, None, True, (True, None)),
    ("cd", 10, False, None, True, (False, "optical drive")),
    ("mmc", 10, False, None, False, (False, "eMMC built-in storage, not a USB or SD drive")),
])
def test_eligibility(bus: str, size: int, ro: bool, system: str | None, explicit: bool,
                     expected: tuple[bool, str | None]) -> None:
    assert eligibility(bus=bus, size=size, read_only=ro, system=system,
                       explicit=explicit) == expected


def test_explain_and_sizes() -> None:
    assert explain("/dev/sda", "system drive (/ is mounted from it)") \
        == "/dev/sda is a system drive (/ is mounted from it)"
    assert explain("/dev/sdd", "no medium").startswith("/dev/sdd has no medium")
    assert explain("/dev/sdg", "read-only") == "/dev/sdg is read-only (write-protected)"
    assert format_size(2 * 10**9) == "1.9 GiB"
    assert format_size(511) == "511 B"
    assert make_drive().label == "SanDisk Cruzer Blade"
    assert make_drive(vendor="", model="").label == ""
    assert make_drive(vendor="WD", model="WD Elements").label == "WD Elements"


def test_to_json_is_plain_data() -> None:
    data = make_drive(mountpoints=("/media/x",)).to_json()
    for key in ("path", "vendor", "model", "serial", "size", "bus", "removable", "read_only",
                "mountpoints", "eligible", "reason"):
        assert key in data
    assert data["mountpoints"] == ["/media/x"]


def _fake_block(root: Path, path: str, dev: str, *, partition: bool = False) -> Path:
    directory = root / "devices" / path
    directory.mkdir(parents=True)
    (directory / "dev").write_text(dev + "\n")
    if partition:
        (directory / "partition").write_text("1\n")
    link = root / "dev" / "block" / dev
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(directory)
    return directory


def test_stack_follows_partitions_and_dm_slaves(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount of /dev/dm-0 (LUKS on sdb1) protects sdb: walk slaves, then partition→disk."""
    _fake_block(tmp_path, "usb/block/sdb", "8:16")
    sdb1 = _fake_block(tmp_path, "usb/block/sdb/sdb1", "8:17", partition=True)
    dm0 = _fake_block(tmp_path, "virtual/block/dm-0", "253:0")
    (dm0 / "slaves").mkdir()
    (dm0 / "slaves" / "sdb1").symlink_to(sdb1)
    monkeypatch.setattr(sysfs, "ROOT", str(tmp_path))
    assert drives.stack_of(os.makedev(253, 0)) == {
        os.makedev(253, 0), os.makedev(8, 17), os.makedev(8, 16)}
    assert drives.stack_of(os.makedev(8, 16)) == {os.makedev(8, 16)}


# ------------------------------------------------------------------------------------------
# Discovery under umockdev, through real libudev

DISCOVER = """
import json
from popsicle_py.drives import discover
print(json.dumps({
    "all": [d.to_json() for d in discover(include_all=True)],
    "usb": [d.path for d in discover()],
}))
"""

# fixture -> {path: (listed without include_all, bus, eligible, reason)}
EXPECTED: dict[str, dict[str, tuple[bool, str, bool, str | None]]] = {
    "usb-stick": {"/dev/sdb": (True, "usb", True, None)},
    "usb-hdd": {"/dev/sdc": (True, "usb", True, None)},
    "usb-reader-2slot": {"/dev/sdd": (True, "usb", False, "no medium"),
                         "/dev/sde": (True, "usb", True, None)},
    "usb-reader-empty": {"/dev/sdf": (True, "usb", False, "no medium")},
    "usb-card-ro": {"/dev/sdg": (True, "usb", False, "read-only")},
    "sd-builtin": {"/dev/mmcblk0": (True, "sd", True, None)},
    "emmc": {"/dev/mmcblk1": (False, "mmc", False,
                              "eMMC built-in storage, not a USB or SD drive"),
             "/dev/mmcblk1boot0": (False, "mmc", False,
                                   "eMMC built-in storage, not a USB or SD drive")},
    "sata": {"/dev/sda": (False, "ata", False, "not a USB or SD drive")},
    "nvme": {"/dev/nvme0n1": (False, "nvme", False, "not a USB or SD drive")},
    "usb-optical": {"/dev/sr0": (False, "cd", False, "optical drive")},
}


def _check(result: object, expected: dict[str, tuple[bool, str, bool, str | None]]) -> None:
    assert isinstance(result, dict)
    by_path = {d["path"]: d for d in result["all"]}
    assert set(by_path) == set(expected)
    assert result["usb"] == sorted(p for p, e in expected.items() if e[0])
    for path, (_, bus, eligible, reason) in expected.items():
        drive = by_path[path]
        assert (drive["bus"], drive["eligible"], drive["reason"]) == (bus, eligible, reason), path
        assert drive["system"] is False
        assert drive["has_media"] is (drive["size"] > 0)


@needs_umockdev
@pytest.mark.umockdev
@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_each_fixture_lands_where_the_rules_say(fixture: str, tmp_path: Path) -> None:
    _check(in_testbed([f"{fixture}.umockdev"], DISCOVER, tmp_path), EXPECTED[fixture])


@needs_umockdev
@pytest.mark.umockdev
def test_all_fixtures_together(tmp_path: Path) -> None:
    """One machine with everything plugged in: only USB and SD drives are offered."""
    result = in_testbed([f"{f}.umockdev" for f in sorted(EXPECTED)], DISCOVER, tmp_path)
    _check(result, {p: e for exp in EXPECTED.values() for p, e in exp.items()})
    assert isinstance(result, dict)
    assert [d["path"] for d in result["all"]] == sorted(d["path"] for d in result["all"])


@needs_umockdev
@pytest.mark.umockdev
def test_identity_from_udev_and_from_sysfs(tmp_path: Path) -> None:
    result = in_testbed(["usb-stick.umockdev", "usb-hdd.umockdev", "nvme.umockdev",
                         "sd-builtin.umockdev", "usb-reader-2slot.umockdev"], DISCOVER, tmp_path)
    assert isinstance(result, dict)
    by_path = {d["path"]: d for d in result["all"]}
    stick = by_path["/dev/sdb"]
    assert (stick["label"], stick["serial"], stick["size"]) == (
        "SanDisk Cruzer Blade", "4C530001231105117303", 30031872 * 512)
    assert stick["partitions"] == ["/dev/sdb1"]
    assert stick["devnum"] == os.makedev(8, 16)
    hdd = by_path["/dev/sdc"]  # no udev properties: USB ancestor and sysfs only
    assert (hdd["label"], hdd["serial"], hdd["removable"]) == (
        "WD Elements 25A2", "575844314138383735383530", False)
    nvme = by_path["/dev/nvme0n1"]
    assert (nvme["model"], nvme["serial"], nvme["logical_block_size"]) == (
        "WDC PC SN730 SDBQNTY-512G", "20095N801234", 4096)
    assert by_path["/dev/mmcblk0"]["partitions"] == ["/dev/mmcblk0p1"]
    assert by_path["/dev/sde"]["size"] == 62521344 * 512


# Recorded from the VM tier's guest (tests/vm/run --record): the real kernel's sysfs and the
# real systemd-udevd's properties, one machine.  fixture -> {path: (listed, bus, eligible,
# reason)}.
RECORDED: dict[str, dict[str, tuple[bool, str, bool, str | None]]] = {
    "vm-usb-stick": {"/dev/sda": (True, "usb", True, None)},
    "vm-usb-stick-hub": {"/dev/sdc": (True, "usb", True, None)},
    "vm-usb-reader-2lun": {"/dev/sde": (True, "usb", True, None),
                           "/dev/sdb": (True, "usb", True, None)},
    "vm-sata": {"/dev/sdf": (False, "ata", False, "not a USB or SD drive")},
    "vm-virtio": {"/dev/vda": (False, "virtio", False, "not a USB or SD drive")},
}


# The recorded virtio disk is 254:0, which may well be the disk this machine's / is mounted
# from: judge the recordings against a system with nothing mounted from them.
DISCOVER_UNMOUNTED = DISCOVER.replace("discover(", "discover(facts=SystemFacts(), ").replace(
    "import discover", "import SystemFacts, discover")


@needs_umockdev
@pytest.mark.umockdev
@pytest.mark.parametrize("fixture", sorted(RECORDED))
def test_each_recorded_tree_lands_where_the_rules_say(fixture: str, tmp_path: Path) -> None:
    _check(in_testbed([f"{fixture}.umockdev"], DISCOVER_UNMOUNTED, tmp_path), RECORDED[fixture])


@needs_umockdev
@pytest.mark.umockdev
def test_recorded_machine_identities(tmp_path: Path) -> None:
    """All recordings together are the guest as it was: identities as its udev gave them."""
    result = in_testbed([f"{f}.umockdev" for f in sorted(RECORDED)], DISCOVER_UNMOUNTED,
                        tmp_path)
    _check(result, {p: e for exp in RECORDED.values() for p, e in exp.items()})
    assert isinstance(result, dict)
    by_path = {d["path"]: d for d in result["all"]}
    # The model comes from the SCSI layer ("QEMU HARDDISK"), not the USB product string
    # ("QEMU USB HARDDRIVE"); the serial is the USB device's, shared by a reader's LUNs.
    assert {(d["label"], d["serial"], d["removable"]) for p, d in by_path.items()
            if p in ("/dev/sde", "/dev/sdb")} == {("QEMU HARDDISK", "READER-0001", True)}
    assert (by_path["/dev/sda"]["serial"], by_path["/dev/sdc"]["serial"]) == (
        "DUP-0001", "HUB-0001")  # the stick behind a hub: its own serial, not the hub's
    assert by_path["/dev/sda"]["size"] == 48 << 20
    sata, virtio = by_path["/dev/sdf"], by_path["/dev/vda"]
    assert (sata["vendor"], sata["model"], sata["serial"]) == ("", "QEMU HARDDISK", "SATA-0001")
    assert (virtio["serial"], virtio["removable"]) == ("VIRT-0001", False)


EXPLICIT = """
import dataclasses, json
from popsicle_py.drives import TargetError, drive_for_path, still_same
out = {}
for path in ("/dev/sdb", "/dev/sdb1", "/dev/mmcblk0p1", "/dev/sr0", "/dev/nope"):
    try:
        out[path] = drive_for_path(path).to_json()
    except TargetError as e:
        out[path] = str(e)
d = drive_for_path("/dev/sdb")
out["same"] = still_same(d)
out["serial"] = still_same(dataclasses.replace(d, serial="OTHER"))
out["size"] = still_same(dataclasses.replace(d, size=d.size * 2))
out["devnum"] = still_same(dataclasses.replace(d, devnum=d.devnum + 1))
out["gone"] = still_same(dataclasses.replace(d, path="/dev/sdz"))
print(json.dumps(out))
"""


@needs_umockdev
@pytest.mark.umockdev
def test_explicit_targets_and_still_same_in_testbed(tmp_path: Path) -> None:
    result = in_testbed(["usb-stick.umockdev", "sd-builtin.umockdev", "usb-optical.umockdev"],
                        EXPLICIT, tmp_path)
    assert isinstance(result, dict)
    assert result["/dev/sdb"]["eligible"] is True
    assert result["/dev/sdb1"] == "/dev/sdb1 is a partition; did you mean /dev/sdb?"
    assert result["/dev/mmcblk0p1"] == "/dev/mmcblk0p1 is a partition; did you mean /dev/mmcblk0?"
    assert result["/dev/sr0"]["reason"] == "optical drive"
    assert result["/dev/nope"] == "/dev/nope does not exist"
    assert result["same"] is None
    assert result["serial"] == ("/dev/sdb is not the drive you confirmed (different serial);"
                                " nothing was written to it")
    assert "(different size)" in result["size"]
    assert "(different device number)" in result["devnum"]
    assert "gone" in result["gone"]


# ------------------------------------------------------------------------------------------
# Loop devices: real block devices named explicitly


@needs_loop
@pytest.mark.root
def test_loop_device_is_an_eligible_explicit_target() -> None:
    with loop_device(4 * MiB) as loop:
        drive = drive_for_path(loop.path)
        assert (drive.path, drive.name, drive.bus) == (loop.path, loop.name, "loop")
        assert drive.size == 4 * MiB
        assert drive.devnum == loop.devnum
        assert (drive.read_only, drive.eligible, drive.reason, drive.system) == (
            False, True, None, False)
        assert drive.logical_block_size == 512
        assert drive.mountpoints == ()
        assert still_same(drive) is None
        # The same drive changes size under its path: refuse it.
        os.truncate(loop.backing, 8 * MiB)
        subprocess.run(["losetup", "-c", loop.path], check=True)
        assert "(different size)" in (still_same(drive) or "")


@needs_loop
@pytest.mark.root
def test_read_only_loop_is_ineligible() -> None:
    with loop_device(2 * MiB, read_only=True) as loop:
        drive = drive_for_path(loop.path)
        assert (drive.read_only, drive.eligible, drive.reason) == (True, False, "read-only")


@needs_loop
@pytest.mark.root
def test_partition_of_a_loop_device_is_refused_with_a_hint(tmp_path: Path) -> None:
    with loop_device(4 * MiB, partitions=[(2048, 4096)]) as loop:
        part = f"{loop.path}p1"
        with pytest.raises(TargetError) as info:
            drive_for_path(part)
        assert str(info.value) == f"{part} is a partition; did you mean {loop.path}?"
        assert info.value.path == part
        assert drive_for_path(loop.path).partitions == (part,)
        link = tmp_path / "by-id-part1"
        link.symlink_to(part)
        with pytest.raises(TargetError, match=rf"\({part}\) is a partition; did you mean"):
            drive_for_path(str(link))


@needs_loop
@pytest.mark.root
def test_symlink_resolves_to_the_device(tmp_path: Path) -> None:
    with loop_device(2 * MiB) as loop:
        link = tmp_path / "usb-Some_Stick-0:0"
        link.symlink_to(loop.path)
        drive = drive_for_path(str(link))
        assert drive.path == loop.path
        assert drive.devnum == loop.devnum


def test_non_devices_are_refused(tmp_path: Path) -> None:
    regular = tmp_path / "disk.img"
    regular.write_bytes(b"\0" * 4096)
    with pytest.raises(TargetError, match=r"is not a block device \(a regular file\)$"):
        drive_for_path(str(regular))
    with pytest.raises(TargetError, match=r"is not a block device \(a directory\)$"):
        drive_for_path(str(tmp_path))
    with pytest.raises(TargetError, match=r"^/dev/null is not a block device \(a character"):
        drive_for_path("/dev/null")
    missing = str(tmp_path / "nope")
    with pytest.raises(TargetError) as info:
        drive_for_path(missing)
    assert str(info.value) == f"{missing} does not exist"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    with pytest.raises(TargetError, match="does not exist"):
        drive_for_path(str(dangling))


@needs_loop
@pytest.mark.root
def test_loop_holding_the_image_is_a_system_drive(tmp_path: Path) -> None:
    """Writing a loop device whose backing file is the image would overwrite the image."""
    with loop_device(2 * MiB) as loop:
        with pytest.raises(TargetError, match="holds the image being written"):
            drive_for_path(loop.path, image_path=loop.backing)
        other = tmp_path / "other.img"
        other.write_bytes(b"x")
        assert drive_for_path(loop.path, image_path=str(other)).eligible


@needs_loop
@pytest.mark.root
def test_discovery_lists_loop_devices_only_with_include_all() -> None:
    with loop_device(2 * MiB) as loop:
        assert loop.path not in {d.path for d in drives.discover()}
        listed = {d.path: d for d in drives.discover(include_all=True)}
        assert listed[loop.path].reason == "not a USB or SD drive"
        assert listed[loop.path].bus == "loop"


@needs_loop
@pytest.mark.root
def test_loop_over_a_file_on_another_drive_rests_on_that_drive() -> None:
    """A loop device backed by a file on drive A protects A (live systems boot this way)."""
    with loop_device(8 * MiB) as outer, mounted_ext4(outer.path) as mountpoint:
        inner_dir = os.path.join(mountpoint, "dir")
        os.mkdir(inner_dir)
        with loop_device(MiB, directory=inner_dir) as inner:
            assert outer.devnum in drives.stack_of(inner.devnum)


@needs_loop
@pytest.mark.root
@pytest.mark.skipif(shutil.which("swapon") is None, reason="swapon is not installed")
def test_active_swap_is_a_system_drive() -> None:
    with loop_device(4 * MiB) as loop:
        subprocess.run(["mkswap", "-q", loop.path], check=True, capture_output=True)
        subprocess.run(["swapon", loop.path], check=True)
        try:
            with pytest.raises(TargetError) as info:
                drive_for_path(loop.path)
            assert str(info.value) == f"{loop.path} is a system drive (active swap)"
        finally:
            subprocess.run(["swapoff", loop.path], check=True)


def test_the_real_root_disk_is_a_system_drive() -> None:
    """Whatever this machine boots from is listed, and refused, as a system drive."""
    root_dev = os.stat("/").st_dev
    if not os.path.exists(f"/sys/dev/block/{os.major(root_dev)}:{os.minor(root_dev)}"):
        pytest.skip("/ is not on a block device here (overlay, tmpfs...)")
    holding = [d for d in drives.discover(include_all=True) if d.devnum in
               drives.stack_of(root_dev)]
    assert holding, "the disk under / was not discovered"
    for drive in holding:
        assert drive.system and not drive.eligible
        assert drive.reason == "system drive (/ is mounted from it)"
        with pytest.raises(TargetError, match=r"is a system drive \(/ is mounted from it\)$"):
            drive_for_path(drive.path)


def test_an_empty_device_name_gets_one_clear_line(tmp_path: Path) -> None:
    """``flash IMG ''`` (an unset shell variable): no "did you mean /dev/?"."""
    from conftest import popsicle_cmd

    image = tmp_path / "disk.img"
    image.write_bytes(b"\1" * 4096)
    done = subprocess.run([*popsicle_cmd(), "flash", str(image), "", "--yes"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr == ("popsicle-py: the drive's name is empty (an unset variable?); "
                           "name a drive such as /dev/sdb\n"), done.stderr


@pytest.mark.parametrize("command", ["flash", "verify"])
def test_an_empty_image_name_gets_one_clear_line(command: str) -> None:
    """``flash '' DEV`` (an unset shell variable): not "is a directory" for the current one."""
    from conftest import popsicle_cmd

    done = subprocess.run([*popsicle_cmd(), command, "", "/dev/null"], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "the image's name is empty (an unset variable?)" in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


@contextlib.contextmanager
def unattached_loop() -> Iterator[str]:
    """A loop device of our own with no file: made at a high index with LOOP_CTL_ADD (never
    ``losetup -f``'s free one, which another test may attach meanwhile), removed after."""
    import fcntl

    loop_ctl_add, loop_ctl_remove = 0x4C80, 0x4C81
    fd = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for index in range(200 + os.getpid() % 50, 1 << 20, 50):
            try:
                fcntl.ioctl(fd, loop_ctl_add, index)
                break
            except OSError:  # taken: another
                continue
        try:
            yield f"/dev/loop{index}"
        finally:
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, loop_ctl_remove, index)
    finally:
        os.close(fd)


def test_a_loop_device_with_no_file_is_named_so(tmp_path: Path) -> None:
    """An unattached /dev/loopN is not a card reader waiting for a card."""
    from conftest import popsicle_cmd

    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    with unattached_loop() as free:
        done = subprocess.run([*popsicle_cmd(), "flash", str(image), free, "--yes"],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"popsicle-py: {free} is a loop device with no file attached\n"


OUT_OF_DESCRIPTORS = """
import json, os, resource, sys
import pyudev
from popsicle_py import drives
from popsicle_py.drives.udev import udev_context

path = sys.argv[1]
facts = drives.gather_facts()
st = os.stat(path)
device = pyudev.Devices.from_device_number(udev_context(), "block", st.st_rdev)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
drive = drives.build_drive(device, facts, explicit=True)
for fd in held:
    os.close(fd)
print(json.dumps([drive.eligible, drive.reason, drive.size]))
"""


def test_a_drive_read_while_out_of_descriptors_is_refused_saying_so_not_no_medium(
        loop_factory: Any) -> None:
    """EMFILE while reading a drive's sysfs size is no fact about the drive: it is refused
    with that reason, never taken for a reader without a card ("no medium")."""
    loop = loop_factory(4 << 20)
    done = subprocess.run([sys.executable, "-c", OUT_OF_DESCRIPTORS, loop.path],
                          capture_output=True, text=True, check=True)
    eligible, reason, size = json.loads(done.stdout)
    assert eligible is False and size == 0
    assert reason == ("its attributes could not be read (Too many open files); plug it in "
                      "again")
