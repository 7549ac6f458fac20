"""Tests for popsicle_py.plan: pure refusal rules, then real loop devices and mounts."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from loopdev import (
    DROP_OTHER_TESTS_MOUNTS,
    HAVE_LOSETUP,
    HAVE_UMOCKDEV,
    IS_ROOT,
    MiB,
    in_testbed,
    is_mounted,
    loop_device,
    mounted_ext4,
    new_mount_namespace,
    python_env,
)

from popsicle_py.drives import Drive
from popsicle_py.plan import (
    DEFAULT_MAX_AUTO_SIZE,
    Plan,
    PlanError,
    make_plan,
    make_read_plan,
    refusals,
    unmount_targets,
    warnings_for,
)

needs_umockdev = pytest.mark.skipif(not HAVE_UMOCKDEV, reason="umockdev-run is not installed")
needs_loop = pytest.mark.skipif(not (IS_ROOT and HAVE_LOSETUP),
                                reason="loop devices need root and losetup")


def make_drive(**changes: object) -> Drive:
    """A plain eligible, unmounted 1 GB USB stick, changed as a test needs."""
    base = Drive(path="/dev/sdb", name="sdb", devnum=os.makedev(8, 16), vendor="SanDisk",
                 model="Cruzer Blade", serial="4C53", size=10**9, logical_block_size=512,
                 bus="usb", removable=True, read_only=False, has_media=True,
                 partitions=("/dev/sdb1",), mountpoints=(), swap=False, eligible=True,
                 reason=None, system=False)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Pure rules


def test_a_fitting_unmounted_drive_has_no_refusals() -> None:
    assert refusals(make_drive(), 10**9, unmount=False) == []
    assert refusals(make_drive(), None, unmount=False) == []


def test_image_larger_than_drive_gives_both_sizes() -> None:
    assert refusals(make_drive(), 2 * 10**9, unmount=False) == [
        "image is larger than /dev/sdb: 1.9 GiB image, 953.7 MiB drive"]


def test_sizes_that_round_alike_are_given_in_bytes() -> None:
    (line,) = refusals(make_drive(), 10**9 + 1, unmount=False)
    assert line == ("image is larger than /dev/sdb: 953.7 MiB (1000000001 bytes) image,"
                    " 953.7 MiB (1000000000 bytes) drive")


def test_mounted_drive_is_refused_unless_unmount_is_asked() -> None:
    drive = make_drive(mountpoints=("/media/u/STICK", "/mnt/x"))
    assert refusals(drive, 1, unmount=False) == [
        "/dev/sdb is mounted at /media/u/STICK, /mnt/x; use --unmount to unmount it"]
    assert refusals(drive, 1, unmount=True) == []
    assert warnings_for(drive, unmount=True) == (
        "mounted at /media/u/STICK, /mnt/x (will be unmounted)",)


def test_system_drive_is_never_overridable() -> None:
    drive = make_drive(eligible=False, system=True, mountpoints=("/",),
                       reason="system drive (/ is mounted from it)")
    assert refusals(drive, 1, unmount=True) == [
        "/dev/sdb is a system drive (/ is mounted from it)"]


@pytest.mark.parametrize(("reason", "line"), [
    ("read-only", "/dev/sdb is read-only (write-protected)"),
    ("no medium", "/dev/sdb has no medium (is a card inserted?)"),
    ("holds the image", "/dev/sdb holds the image being written"),
    ("active swap", "/dev/sdb is a system drive (active swap)"),
])
def test_ineligible_drive_gives_its_reason_only(reason: str, line: str) -> None:
    drive = make_drive(eligible=False, reason=reason, size=0, mountpoints=("/mnt/x",))
    assert refusals(drive, 10**12, unmount=False) == [line]


def test_held_drive_is_refused() -> None:
    (line,) = refusals(make_drive(holders=("/dev/dm-0",)), 1, unmount=True)
    assert line.startswith("/dev/sdb is in use by /dev/dm-0")


def test_warnings() -> None:
    big = make_drive(size=DEFAULT_MAX_AUTO_SIZE + 1)
    assert warnings_for(big, unmount=False) == ("larger than 128 GiB",)
    assert warnings_for(make_drive(bus="ata"), unmount=False) == ("not a USB or SD drive (ata)",)
    assert warnings_for(make_drive(bus="loop"), unmount=False) == ()


def test_no_targets_at_all() -> None:
    with pytest.raises(PlanError) as info:
        make_plan([], all_usb=False, image_path=None, image_size=None, unmount=False)
    assert info.value.lines == ["no target drives: name devices or use --all-usb"]


# ------------------------------------------------------------------------------------------
# Real loop devices


@needs_loop
@pytest.mark.root
def test_plan_with_loop_devices_and_large_warning() -> None:
    with loop_device(2 * MiB) as a, loop_device(3 * MiB) as b:
        plan = make_plan([a.path, b.path], all_usb=False, image_path=None,
                         image_size=2 * MiB, unmount=False, max_auto_size=MiB)
        assert [d.path for d in plan.targets] == [a.path, b.path]
        assert plan.warnings == {a.path: ("larger than 1 MiB",), b.path: ("larger than 1 MiB",)}
        assert plan.notes == ()


@needs_loop
@pytest.mark.root
def test_every_refusal_is_collected(tmp_path: Path) -> None:
    """One run reports every problem: same drive twice, partition, file, missing, too small."""
    regular = tmp_path / "file.img"
    regular.write_bytes(b"x")
    with loop_device(2 * MiB) as small, \
            loop_device(4 * MiB, partitions=[(2048, 2048)]) as parted, \
            loop_device(2 * MiB, read_only=True) as ro:
        link = tmp_path / "alias"
        link.symlink_to(small.path)
        image = str(tmp_path / "image.img")
        with pytest.raises(PlanError) as info:
            make_plan([small.path, str(link), f"{parted.path}p1", str(regular),
                       "/dev/does-not-exist", ro.path], all_usb=False, image_path=image,
                      image_size=3 * MiB, unmount=False)
        assert info.value.lines == [
            f"{link} and {small.path} are the same drive ({small.path}); name it once",
            f"{parted.path}p1 is a partition; did you mean {parted.path}?",
            f"{regular} is not a block device (a regular file)",
            "/dev/does-not-exist does not exist",
            f"image is larger than {small.path}: 3 MiB image, 2 MiB drive",
            f"{ro.path} is read-only (write-protected)",
        ]
        assert str(info.value) == "\n".join(info.value.lines)


@needs_loop
@pytest.mark.root
def test_image_larger_than_drive_leaves_it_untouched() -> None:
    with loop_device(2 * MiB) as loop:
        with open(loop.path, "rb") as f:
            before = f.read()
        with pytest.raises(PlanError,
                           match=r"2\.0 MiB \(2097153 bytes\) image, 2 MiB \(2097152 bytes\)"):
            make_plan([loop.path], all_usb=False, image_path=None, image_size=2 * MiB + 1,
                      unmount=True)
        with open(loop.path, "rb") as f:
            assert f.read() == before


@needs_loop
@pytest.mark.root
def test_mounted_drive_refused_then_unmounted() -> None:
    with loop_device(8 * MiB) as loop, mounted_ext4(loop.path) as mountpoint:
        with pytest.raises(PlanError) as info:
            make_plan([loop.path], all_usb=False, image_path=None, image_size=MiB,
                      unmount=False)
        assert info.value.lines == [
            f"{loop.path} is mounted at {mountpoint}; use --unmount to unmount it"]
        # O_EXCL is what the kernel uses to refuse it too.
        with pytest.raises(OSError):
            os.close(os.open(loop.path, os.O_WRONLY | os.O_EXCL))

        plan = make_plan([loop.path], all_usb=False, image_path=None, image_size=MiB,
                         unmount=True)
        assert plan.targets[0].mountpoints == (mountpoint,)
        assert plan.warnings[loop.path] == (f"mounted at {mountpoint} (will be unmounted)",)
        unmount_targets(plan)
        assert not is_mounted(mountpoint)
        os.close(os.open(loop.path, os.O_WRONLY | os.O_EXCL))


@needs_loop
@pytest.mark.root
def test_nested_mounts_are_unmounted_deepest_first() -> None:
    with loop_device(8 * MiB, partitions=[(2048, 6144), (8192, 6144)]) as loop:
        p1, p2 = f"{loop.path}p1", f"{loop.path}p2"
        with mounted_ext4(p1) as outer:
            inner = os.path.join(outer, "inner")
            os.mkdir(inner)
            subprocess.run(["mkfs.ext4", "-q", "-F", p2], check=True)
            subprocess.run(["mount", p2, inner], check=True)
            try:
                plan = make_plan([loop.path], all_usb=False, image_path=None,
                                 image_size=None, unmount=True)
                assert set(plan.targets[0].mountpoints) == {outer, inner}
                unmount_targets(plan)
                assert not is_mounted(inner)
                assert not is_mounted(outer)
            finally:
                if is_mounted(inner):
                    subprocess.run(["umount", "-l", inner], check=False)


@needs_loop
@pytest.mark.root
def test_busy_unmount_is_a_clear_error() -> None:
    with loop_device(8 * MiB) as loop, mounted_ext4(loop.path) as mountpoint:
        plan = make_plan([loop.path], all_usb=False, image_path=None, image_size=None,
                         unmount=True)
        with open(os.path.join(mountpoint, "open-file"), "w"), \
                pytest.raises(PlanError) as info:
            unmount_targets(plan)
        assert info.value.lines == [
            f"could not unmount {mountpoint} ({loop.path}): target is busy"]
        assert is_mounted(mountpoint)
        unmount_targets(plan)
        assert not is_mounted(mountpoint)


SYSTEM_DRIVE = """
import json, sys
from popsicle_py.plan import PlanError, make_plan, make_read_plan
try:
    if sys.argv[2] == "read":
        make_read_plan([sys.argv[1]], None)
    else:
        make_plan([sys.argv[1]], all_usb=False, image_path=None, image_size=None, unmount=True)
    print(json.dumps(None))
except PlanError as e:
    print(json.dumps(e.lines))
"""


@needs_loop
@pytest.mark.root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare is not installed")
@pytest.mark.parametrize("purpose", ["write", "read"])
@pytest.mark.parametrize("where", ["/boot", "/var"])
def test_system_drive_refused_in_private_mount_namespace(where: str, purpose: str) -> None:
    """Mounted on /boot (in a namespace of its own): refused even with --unmount, and for
    reading back too (``verify``), as ``drive_for_path`` refuses it."""
    with loop_device(8 * MiB) as loop:
        subprocess.run(["mkfs.ext4", "-q", "-F", loop.path], check=True)
        before = is_mounted(where)
        script = DROP_OTHER_TESTS_MOUNTS + f'mount "$1" {where} && exec "$2" -c "$3" "$1" "$4"'
        result = subprocess.run(
            [*new_mount_namespace(), "sh", "-c", script, "sh",
             loop.path, sys.executable, SYSTEM_DRIVE, purpose],
            capture_output=True, text=True, env=python_env(), timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == [
            f"{loop.path} is a system drive ({where} is mounted from it)"]
        assert is_mounted(where) == before  # the mount stayed in its namespace


@needs_loop
@pytest.mark.root
def test_drive_holding_the_image_is_refused(tmp_path: Path) -> None:
    """The image lives on a filesystem of the target: refused as a system drive."""
    with loop_device(8 * MiB) as loop, mounted_ext4(loop.path) as mountpoint:
        image = os.path.join(mountpoint, "image.img")
        with open(image, "wb") as f:
            f.write(b"\0" * 4096)
        with pytest.raises(PlanError) as info:
            make_plan([loop.path], all_usb=False, image_path=image, image_size=4096,
                      unmount=True)
        assert info.value.lines == [f"{loop.path} holds the image being written"]


# ------------------------------------------------------------------------------------------
# Drives to read back (verify)


@needs_loop
@pytest.mark.root
def test_read_plan_refuses_in_the_words_of_the_write_plan(tmp_path: Path) -> None:
    """Same drive twice, partition, file, missing, too small: make_plan's lines, in its order
    (what cannot be a target first, then the sizes)."""
    regular = tmp_path / "file.img"
    regular.write_bytes(b"x")
    with loop_device(2 * MiB) as small, \
            loop_device(4 * MiB, partitions=[(2048, 2048)]) as parted, \
            loop_device(2 * MiB) as exact:
        link = tmp_path / "alias"
        link.symlink_to(small.path)
        devices = [small.path, str(link), f"{parted.path}p1", str(regular),
                   "/dev/does-not-exist", exact.path]
        with pytest.raises(PlanError) as read:
            make_read_plan(devices, 2 * MiB + 1)
        assert read.value.lines == [
            f"{link} and {small.path} are the same drive ({small.path}); name it once",
            f"{parted.path}p1 is a partition; did you mean {parted.path}?",
            f"{regular} is not a block device (a regular file)",
            "/dev/does-not-exist does not exist",
            f"image is larger than {small.path}: 2.0 MiB (2097153 bytes) image,"
            " 2 MiB (2097152 bytes) drive",
            f"image is larger than {exact.path}: 2.0 MiB (2097153 bytes) image,"
            " 2 MiB (2097152 bytes) drive",
        ]
        with pytest.raises(PlanError) as write:
            make_plan(devices, all_usb=False, image_path=None, image_size=2 * MiB + 1,
                      unmount=False)
        assert write.value.lines == read.value.lines


@needs_loop
@pytest.mark.root
def test_read_plan_reads_what_writing_would_refuse() -> None:
    """Mounted, read-only, not USB, larger than the image: nothing is written, all are read,
    in the order named; an image of unknown size is not compared."""
    with loop_device(8 * MiB) as mounted, mounted_ext4(mounted.path) as mountpoint, \
            loop_device(2 * MiB, read_only=True) as ro:
        plan = make_read_plan([ro.path, mounted.path], 2 * MiB)
        assert [d.path for d in plan.targets] == [ro.path, mounted.path]
        assert plan.targets[1].mountpoints == (mountpoint,)
        assert (plan.notes, plan.warnings) == ((), {})
        assert [d.path for d in make_read_plan([mounted.path], None).targets] == [mounted.path]
        with pytest.raises(PlanError):
            make_plan([ro.path, mounted.path], all_usb=False, image_path=None,
                      image_size=2 * MiB, unmount=False)


def test_read_plan_without_devices() -> None:
    with pytest.raises(PlanError) as info:
        make_read_plan([], 10)
    assert info.value.lines == ["no target drives: name devices"]


# ------------------------------------------------------------------------------------------
# --all-usb under umockdev

ALL_USB = """
import json
from popsicle_py.plan import PlanError, make_plan
try:
    plan = make_plan([], all_usb=True, image_path=None, image_size=10**9, unmount=False)
    print(json.dumps({"targets": [d.path for d in plan.targets], "notes": list(plan.notes),
                      "warnings": plan.warnings}))
except PlanError as e:
    print(json.dumps({"error": e.lines, "notes": list(e.notes)}))
"""

ALL_FIXTURES = ["usb-stick", "usb-hdd", "usb-reader-2slot", "usb-reader-empty", "usb-card-ro",
                "sd-builtin", "emmc", "sata", "nvme", "usb-optical"]


@needs_umockdev
@pytest.mark.umockdev
def test_all_usb_picks_eligible_small_drives(tmp_path: Path) -> None:
    result = in_testbed([f"{f}.umockdev" for f in ALL_FIXTURES], ALL_USB, tmp_path)
    assert result == {
        "targets": ["/dev/mmcblk0", "/dev/sdb", "/dev/sde"],
        "notes": [
            "skipped /dev/sdc (WD Elements 25A2, 931.5 GiB): larger than 128 GiB;"
            " name it explicitly to use it",
            "skipped /dev/sdd (Generic STORAGE DEVICE): no medium",
            "skipped /dev/sdf (Generic- SD/MMC): no medium",
            "skipped /dev/sdg (Mass Storage Device, 7.4 GiB): read-only",
        ],
        "warnings": {},
    }


@needs_umockdev
@pytest.mark.umockdev
def test_all_usb_with_nothing_eligible(tmp_path: Path) -> None:
    result = in_testbed(["usb-reader-empty.umockdev", "sata.umockdev"], ALL_USB, tmp_path)
    assert result == {"error": ["no target drives: no eligible USB or SD drive was found"],
                      "notes": ["skipped /dev/sdf (Generic- SD/MMC): no medium"]}


@needs_umockdev
@pytest.mark.umockdev
def test_all_usb_on_the_recorded_guest_takes_sticks_and_reader_luns(tmp_path: Path) -> None:
    """Real trees (tests/fixtures/vm-*): a stick, one behind a hub, a two-LUN reader, SATA,
    virtio.  --all-usb takes the four USB disks and says nothing of the internal ones."""
    fixtures = ["vm-usb-stick", "vm-usb-stick-hub", "vm-usb-reader-2lun", "vm-sata", "vm-virtio"]
    code = ALL_USB.replace("image_size=10**9", "image_size=10**7")  # the disks are 40-64 MiB
    result = in_testbed([f"{f}.umockdev" for f in fixtures], code, tmp_path)
    assert result == {"targets": ["/dev/sda", "/dev/sdb", "/dev/sdc", "/dev/sde"], "notes": [],
                      "warnings": {}}


def test_plan_is_plain_data() -> None:
    plan = Plan(targets=(make_drive(),), notes=("n",), warnings={"/dev/sdb": ("w",)})
    assert plan.targets[0].path == "/dev/sdb"
