"""Never the wrong drive: media identity, and the rules applied to what backs a loop device.

Every safety test here runs the real command on real loop devices (and mounts, btrfs, overlay)
and checks the exit status, the line the user reads, and that the bytes that must not change
did not.  Loop numbers are never assumed; a loop device this file attaches by hand is detached
only while it still stands on the file this test gave it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Loop, fill_pattern, popsicle_cmd
from loopdev import DROP_OTHER_TESTS_MOUNTS, new_mount_namespace

from popsicle_py import drives, media, plan, watch
from popsicle_py.drives import Backing, Drive, Mount
from popsicle_py.flash import OpenError, open_targets
from popsicle_py.identity import LoopKey, MediaIdentity, same_media

MiB = 1 << 20
PATTERN = 0xA5
OTHER = 0x5A

pytestmark = pytest.mark.root


# ----------------------------------------------------------------------------------------------
# Helpers


def popsicle(*args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), *map(str, args)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, check=False)


def sh(*args: object) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))}: {result.stderr.strip()}")
    return result.stdout.strip()


def backing_file(path: str) -> str | None:
    try:
        return (Path("/sys/block") / os.path.basename(path) / "loop" / "backing_file"
                ).read_text().strip()
    except OSError:
        return None


@contextlib.contextmanager
def loop_over(path: str | Path, *, read_only: bool = False) -> Iterator[str]:
    """A second loop device over an existing file or block device; detached afterwards."""
    device = sh("losetup", *(["-r"] if read_only else []), "-f", "--show", path)
    try:
        yield device
    finally:
        if backing_file(device) == str(path):
            subprocess.run(["losetup", "-d", device], capture_output=True, check=False)


@contextlib.contextmanager
def mounted(device: str, directory: Path, *options: str) -> Iterator[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    sh("mount", *options, device, directory)
    try:
        yield directory
    finally:
        # A plain umount first, so the filesystem is gone (not lazily detached) when checked.
        if subprocess.run(["umount", str(directory)], capture_output=True,
                          check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False)


def is_mounted(directory: Path) -> bool:
    return any(line.split()[4] == str(directory)
               for line in Path("/proc/self/mountinfo").read_text().splitlines())


def make_image(directory: Path, size: int = 1 * MiB + 512) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = directory / "image.img"
    path.write_bytes(data)
    return path, data


def digest(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def shm_file(size: int, byte: int) -> Path:
    path = Path("/dev/shm") / f"identity-test-{uuid.uuid4().hex[:8]}.img"
    with open(path, "wb") as f:
        f.truncate(size)
    fill_pattern(path, size, byte)
    return path


def ext4_with_file(device: str, directory: Path) -> contextlib.AbstractContextManager[Path]:
    sh("mkfs.ext4", "-q", "-F", device)
    return mounted(device, directory)


# ----------------------------------------------------------------------------------------------
# Pure rules


def _identity(**changes: object) -> MediaIdentity:
    base = dict(path="/dev/loop3", devnum=os.makedev(7, 3), size=8 * MiB, diskseq=1726,
                serial="", loop=LoopKey(27, 199, 0, 0), is_loop=True)
    base.update(changes)
    return MediaIdentity(**base)  # type: ignore[arg-type]


def test_same_media_says_what_differs() -> None:
    a = _identity()
    assert same_media(a, _identity()) is None
    assert same_media(a, _identity(devnum=os.makedev(7, 4))) == "different device number"
    assert same_media(a, _identity(size=4 * MiB)) == "different size"
    assert same_media(a, _identity(loop=LoopKey(27, 200, 0, 0))) == "attached to a different file"
    assert same_media(a, _identity(loop=LoopKey(5, 9, os.makedev(7, 1), 0))) == (
        "attached to a different device")
    assert same_media(a, _identity(loop=LoopKey(27, 199, 0, 512))) == (
        "different offset into its backing file")
    assert same_media(a, _identity(loop=None)) == "the loop device was detached"
    assert same_media(a, _identity(loop=None, size=0)) == "the loop device was detached"
    stick = _identity(loop=None, is_loop=False)
    assert same_media(stick, _identity(loop=None, is_loop=False, size=0)) == (
        "no medium now: pulled, or its card taken out")
    assert same_media(a, _identity(diskseq=1728)) == "different medium: diskseq 1726, now 1728"
    # Unknown on one side (an old kernel, a serial not read from a descriptor): not compared.
    assert same_media(a, _identity(diskseq=None, serial=None)) is None
    stick = _identity(loop=None, is_loop=False, serial="4C53")
    assert same_media(stick, _identity(loop=None, is_loop=False, serial="9999")) == (
        "different serial")


def _drive(**changes: object) -> Drive:
    base = Drive(path="/dev/loop3", name="loop3", devnum=os.makedev(7, 3), vendor="", model="",
                 serial="", size=8 * MiB, logical_block_size=512, bus="usb", removable=True,
                 read_only=False, has_media=True, partitions=(), mountpoints=(), swap=False,
                 eligible=True, reason=None, system=False)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


LOOP1, LOOP2, LOOP3 = (os.makedev(7, n) for n in (1, 2, 3))
SDB, SDB1 = os.makedev(8, 16), os.makedev(8, 17)
FILE = (27, 199)


def test_a_loop_over_a_mounted_device_or_a_shared_file_is_busy() -> None:
    over_device = Backing(frozenset({LOOP3, LOOP1}), name="/dev/loop1")
    mount = Mount("/dev/loop1", "/mnt/x", frozenset({LOOP1}))
    assert drives.busy_reasons(LOOP3, over_device, [mount]) == (
        "backed by /dev/loop1, which is in use (/dev/loop1 is mounted at /mnt/x)",)
    over_file = Backing(frozenset({LOOP3}), frozenset({FILE}), name="/dev/shm/f.img")
    sibling = Mount("/dev/loop2", "/mnt/y", frozenset({LOOP2}), frozenset({FILE}))
    assert drives.busy_reasons(LOOP3, over_file, [sibling]) == (
        "backed by /dev/shm/f.img, which is in use (/dev/loop2 is mounted at /mnt/y)",)
    # A file on a mounted filesystem is only a file: writing it harms nothing else.
    on_mounted_fs = Backing(frozenset({LOOP3}), frozenset({FILE}), under=frozenset({SDB1, SDB}))
    assert drives.busy_reasons(LOOP3, on_mounted_fs,
                               [Mount("/dev/sdb1", "/media/u", frozenset({SDB1, SDB}))]) == ()
    # A mount of the drive itself is "mounted" (--unmount may help), not "busy".
    assert drives.busy_reasons(LOOP1, Backing(frozenset({LOOP1})), [mount]) == ()


def test_system_rules_look_beneath_a_loop_device() -> None:
    root = Mount("/dev/sdb1", "/", frozenset({SDB1, SDB}))
    over_system_disk = Backing(frozenset({LOOP3, SDB}), name="/dev/sdb")
    facts = drives.SystemFacts(mounts=(root,))
    assert drives.system_reason(over_system_disk, facts) == "system drive (/ is mounted from it)"
    over_a_file_on_it = Backing(frozenset({LOOP3}), frozenset({FILE}), under=frozenset({SDB1}))
    assert drives.system_reason(over_a_file_on_it, facts) is None
    swap_file = drives.SystemFacts(swaps=(drives.Swap("/swapfile", frozenset({SDB1}),
                                                      frozenset({FILE})),))
    assert drives.system_reason(over_a_file_on_it, swap_file) == "active swap"
    image_in_a_loop_mounted_file = drives.SystemFacts(image_devnums=frozenset({LOOP1}),
                                                      image_files=frozenset({FILE}))
    assert drives.system_reason(over_a_file_on_it, image_in_a_loop_mounted_file) == (
        "holds the image")


def test_flash_and_watch_share_one_set_of_rules() -> None:
    busy = _drive(busy=("backed by /dev/loop1, which is in use (/dev/loop1 is mounted at /x)",))
    assert plan.refusals(busy, None, unmount=True) == [
        "/dev/loop3 is backed by /dev/loop1, which is in use (/dev/loop1 is mounted at /x)"]
    assert watch.ineligibility(busy, None, 2**40) == busy.busy[0]
    small = _drive(size=10**9)
    assert watch.ineligibility(small, 2 * 10**9, 2**40) == (
        "smaller than the image (953.7 MiB drive, 1.9 GiB image)")
    assert plan.refusals(small, 2 * 10**9, unmount=False) == [
        "image is larger than /dev/loop3: 1.9 GiB image, 953.7 MiB drive"]
    assert watch.ineligibility(_drive(bus="loop"), None, 2**40) == "not a USB or SD drive"
    assert watch.ineligibility(_drive(size=2**41), None, 2**40) == (
        "larger than 1 TiB (--max-size)")
    mounted_drive = _drive(mountpoints=("/media/u",))
    assert watch.ineligibility(mounted_drive, None, 2**40) == "mounted at /media/u"
    assert plan.refusals(mounted_drive, None, unmount=True) == []


def test_natural_order() -> None:
    names = ["/dev/sdaa", "/dev/loop10", "/dev/sdb", "/dev/loop2", "/dev/sda", "/dev/nvme0n1",
             "/dev/mmcblk0", "/dev/sdz", "/dev/nvme10n1", "/dev/nvme2n1"]
    assert sorted(names, key=drives.natural_key) == [
        "/dev/loop2", "/dev/loop10", "/dev/mmcblk0", "/dev/nvme0n1", "/dev/nvme2n1",
        "/dev/nvme10n1", "/dev/sda", "/dev/sdb", "/dev/sdz", "/dev/sdaa"]


def test_mount_table_and_overlay_layers_are_parsed() -> None:
    text = ("36 35 0:40 / /mnt/with\\040space rw - btrfs /dev/loop5 rw,subvol=/\n"
            "37 35 0:41 / /merged rw - overlay overlay rw,lowerdir=/l1:/l\\:2,upperdir=/u,"
            "workdir=/w\n")
    btrfs, overlay = drives.mount_table(text)
    assert (btrfs.devnum, btrfs.mountpoint, btrfs.fstype, btrfs.source) == (
        os.makedev(0, 40), "/mnt/with space", "btrfs", "/dev/loop5")
    assert drives.overlay_layers(overlay.options) == ["/l1", "/l:2", "/u", "/w"]


# ----------------------------------------------------------------------------------------------
# Media identity on real loop devices


def test_identity_from_sysfs_and_from_the_descriptor_agree(
        loop_factory: Callable[..., Loop]) -> None:
    loop = loop_factory(4 * MiB)
    drive = drives.drive_for_path(loop.path)
    assert drive.diskseq is not None and drive.loop is not None
    st = os.stat(loop.backing)
    assert (drive.loop.dev, drive.loop.ino, drive.loop.rdev, drive.loop.offset) == (
        st.st_dev, st.st_ino, 0, 0)
    assert media.loop_key_of_sysfs(os.stat(loop.path).st_rdev) == drive.loop
    fd = os.open(loop.path, os.O_RDONLY)
    try:
        now = media.identity_of_fd(fd, loop.path)
    finally:
        os.close(fd)
    assert same_media(drive.identity, now) is None
    assert drives.still_same(drive) is None


def test_a_loop_re_attached_after_the_plan_is_refused_on_the_opened_descriptor(
        loop_factory: Callable[..., Loop]) -> None:
    """The last check, on the descriptor about to be written, catches what still_same missed."""
    loop = loop_factory(4 * MiB, fill=PATTERN)
    drive = drives.drive_for_path(loop.path)
    other = shm_file(4 * MiB, OTHER)
    try:
        sh("losetup", "-d", loop.path)
        if subprocess.run(["losetup", loop.path, str(other)], capture_output=True,
                          check=False).returncode != 0:
            pytest.skip(f"{loop.path} was taken by another process once detached")
        try:
            with pytest.raises(OpenError) as info:
                open_targets([drive])  # no still_same: only the descriptor check is left
            assert info.value.lines == [f"{loop.path} is not the drive you confirmed (attached"
                                        " to a different file); nothing was written to it"]
            assert other.read_bytes() == bytes([OTHER]) * (4 * MiB)
        finally:
            if backing_file(loop.path) == str(other):
                sh("losetup", "-d", loop.path)
    finally:
        other.unlink()


def test_re_attached_during_the_confirmation_prompt_is_refused(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """The reported bug: detach + attach another same-size file while the prompt waits."""
    pexpect = pytest.importorskip("pexpect")
    image, _ = make_image(tmp_path)
    loop = loop_factory(4 * MiB, fill=PATTERN)
    other = shm_file(4 * MiB, OTHER)
    cmd = popsicle_cmd()
    child = pexpect.spawn(cmd[0], [*cmd[1:], "flash", str(image), loop.path],
                          env={**os.environ, "COLUMNS": "120"}, dimensions=(40, 120),
                          encoding="utf-8", timeout=60)
    try:
        child.expect(r"Continue\?")
        sh("losetup", "-d", loop.path)
        if subprocess.run(["losetup", loop.path, str(other)], capture_output=True,
                          check=False).returncode != 0:
            child.sendline("n")  # never answer yes for a device that is not ours
            pytest.skip(f"{loop.path} was taken by another process once detached")
        child.sendline("y")
        child.expect(pexpect.EOF)
        output = child.before
        child.close()
        assert child.exitstatus == 2, output
        assert (f"{loop.path} is not the drive you confirmed (attached to a different file)"
                in output.replace("\r\n", " ").replace("\n", " ")), output
        assert other.read_bytes() == bytes([OTHER]) * (4 * MiB)
        assert Path(loop.backing).read_bytes() == bytes([PATTERN]) * (4 * MiB)
    finally:
        if child.isalive():
            child.terminate(force=True)
        if backing_file(loop.path) == str(other):
            sh("losetup", "-d", loop.path)
        other.unlink()


# ----------------------------------------------------------------------------------------------
# What backs a loop device


def test_loop_over_a_mounted_block_device_is_refused(loop_factory: Callable[..., Loop],
                                                      tmp_path: Path) -> None:
    lower = loop_factory(16 * MiB)
    image, data = make_image(tmp_path)
    with ext4_with_file(lower.path, tmp_path / "mnt") as mnt, loop_over(lower.path) as upper:
        (mnt / "keep.txt").write_text("precious")
        for extra in ((), ("--unmount",)):
            result = popsicle("flash", "-y", *extra, image, upper)
            assert result.returncode == 2, result.stderr
            assert (f"{upper} is backed by {lower.path}, which is in use ({lower.path} is "
                    f"mounted at {mnt})") in result.stderr
            assert is_mounted(mnt)
        assert (mnt / "keep.txt").read_text() == "precious"
    assert lower.read(len(data)) != data
    sh("e2fsck", "-fn", lower.path)


def test_a_second_loop_over_the_file_of_a_mounted_loop_is_refused(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    first = loop_factory(16 * MiB)
    image, data = make_image(tmp_path)
    with ext4_with_file(first.path, tmp_path / "mnt") as mnt, \
            loop_over(first.backing) as second:
        result = popsicle("flash", "-y", "--unmount", image, second)
        assert result.returncode == 2, result.stderr
        assert (f"{second} is backed by {first.backing}, which is in use ({first.path} is "
                f"mounted at {mnt})") in result.stderr
        assert is_mounted(mnt)
    assert first.read(len(data)) != data
    sh("e2fsck", "-fn", first.path)


def test_two_targets_on_one_file_are_refused(loop_factory: Callable[..., Loop],
                                             tmp_path: Path) -> None:
    first = loop_factory(4 * MiB, fill=PATTERN)
    image, _ = make_image(tmp_path)
    with loop_over(first.backing) as second:
        result = popsicle("flash", "-y", image, first.path, second)
        assert result.returncode == 2, result.stderr
        assert (f"{second} and {first.path} are stored on the same device or file"
                in result.stderr)
    assert first.read() == bytes([PATTERN]) * first.size


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare is not installed")
def test_a_loop_over_a_system_drive_is_a_system_drive(loop_factory: Callable[..., Loop],
                                                      tmp_path: Path) -> None:
    """A drive mounted on /boot (in a mount namespace of its own) and a loop device over it."""
    lower = loop_factory(16 * MiB)
    sh("mkfs.ext4", "-q", "-F", lower.path)
    image, data = make_image(tmp_path)
    with loop_over(lower.path) as upper:
        script = DROP_OTHER_TESTS_MOUNTS + \
            'mount "$1" /boot && exec "$2" -m popsicle_py flash -y --unmount "$3" "$4"'
        result = subprocess.run(
            [*new_mount_namespace(), "sh", "-c", script, "sh",
             lower.path, sys.executable, str(image), upper],
            capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2, result.stderr
        assert f"{upper} is a system drive (/boot is mounted from it)" in result.stderr
    assert lower.read(len(data)) != data
    sh("e2fsck", "-fn", lower.path)


needs_btrfs = pytest.mark.skipif(
    shutil.which("mkfs.btrfs") is None or "btrfs" not in Path("/proc/filesystems").read_text(),
    reason="needs btrfs-progs and a kernel with btrfs")


@needs_btrfs
def test_the_second_device_of_a_mounted_btrfs_is_mounted(loop_factory: Callable[..., Loop],
                                                         tmp_path: Path) -> None:
    first, second = loop_factory(128 * MiB), loop_factory(128 * MiB)
    sh("mkfs.btrfs", "-q", "-f", "-d", "raid1", "-m", "raid1", first.path, second.path)
    image, data = make_image(tmp_path)
    with mounted(first.path, tmp_path / "mnt") as mnt:
        (mnt / "keep.txt").write_text("precious")
        sh("sync")
        listed = {d.path: d for d in drives.discover(include_all=True)}
        assert listed[second.path].mountpoints == (str(mnt),)
        result = popsicle("flash", "-y", image, second.path)
        assert result.returncode == 2, result.stderr
        assert (f"{second.path} is mounted at {mnt}; use --unmount to unmount it"
                in result.stderr)
        assert (mnt / "keep.txt").read_text() == "precious"
    assert second.read(len(data)) != data
    assert second.read(8, 0x10040) == b"_BHRfS_M"  # its btrfs superblock is still there


@needs_btrfs
def test_an_image_on_btrfs_over_the_target_is_on_the_target(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    first, second = loop_factory(128 * MiB), loop_factory(128 * MiB)
    sh("mkfs.btrfs", "-q", "-f", first.path, second.path)
    with mounted(first.path, tmp_path / "mnt") as mnt:
        image = mnt / "image.img"
        image.write_bytes(os.urandom(MiB))
        before = digest(image)
        result = popsicle("flash", "-y", "--unmount", image, second.path)
        assert result.returncode == 2, result.stderr
        assert f"{second.path} holds the image being written" in result.stderr
        assert is_mounted(mnt) and digest(image) == before


needs_overlay = pytest.mark.skipif("overlay" not in Path("/proc/filesystems").read_text(),
                                   reason="needs a kernel with overlayfs")


@needs_overlay
def test_an_image_on_overlay_over_the_target_is_on_the_target(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    target = loop_factory(32 * MiB)
    with ext4_with_file(target.path, tmp_path / "lower") as lower:
        (lower / "image.img").write_bytes(os.urandom(MiB))
        upper, work = tmp_path / "upper", tmp_path / "work"
        upper.mkdir()
        work.mkdir()
        with mounted("overlay", tmp_path / "merged", "-t", "overlay", "-o",
                     f"lowerdir={lower},upperdir={upper},workdir={work}") as merged:
            image = merged / "image.img"
            before = digest(image)
            result = popsicle("flash", "-y", "--unmount", image, target.path)
            assert result.returncode == 2, result.stderr
            assert f"{target.path} holds the image being written" in result.stderr
            assert is_mounted(lower) and is_mounted(merged)
            assert digest(image) == before
    sh("e2fsck", "-fn", target.path)


@needs_overlay
def test_a_drive_under_an_overlay_lists_the_overlay_too(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """--unmount must unmount the overlay before the filesystem beneath it, or fail clearly."""
    target = loop_factory(32 * MiB)
    with ext4_with_file(target.path, tmp_path / "lower") as lower:
        upper, work = tmp_path / "upper", tmp_path / "work"
        upper.mkdir()
        work.mkdir()
        with mounted("overlay", tmp_path / "merged", "-t", "overlay", "-o",
                     f"lowerdir={lower},upperdir={upper},workdir={work}") as merged:
            drive = drives.drive_for_path(target.path)
            assert drive.mountpoints == (str(lower), str(merged))


# ----------------------------------------------------------------------------------------------
# list: port paths, no free loop slots, the kernel's order


def test_list_all_hides_free_loop_devices_and_sorts_naturally(
        loop_factory: Callable[..., Loop]) -> None:
    loop_factory(MiB)
    free = sh("losetup", "-f")  # the first free slot (created if needed); nothing attached
    result = popsicle("list", "--all", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    paths = [d["path"] for d in listed]
    assert paths == sorted(paths, key=drives.natural_key)
    for d in listed:
        if d["bus"] == "loop":
            assert backing_file(d["path"]) is not None or d["size"] > 0, d
    if backing_file(free) is None:  # not attached by someone else meanwhile
        assert free not in paths


HUB_STICK = """\
P: /devices/pci0000:00/0000:00:14.0/usb1/1-1
N: bus/usb/001/002
E: DEVTYPE=usb_device
E: SUBSYSTEM=usb
A: idVendor=05e3
A: idProduct=0608
A: product=USB2.0 Hub

P: /devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.2
N: bus/usb/001/003
E: DEVTYPE=usb_device
E: SUBSYSTEM=usb
A: idVendor=0781
A: idProduct=5567
A: serial=STICK-0001
A: manufacturer=SanDisk
A: product=Cruzer Blade

P: /devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.2/1-1.2:1.0/host6
E: DEVTYPE=scsi_host
E: SUBSYSTEM=scsi

P: /devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.2/1-1.2:1.0/host6/target6:0:0/6:0:0:0
E: DEVTYPE=scsi_device
E: SUBSYSTEM=scsi
A: vendor=SanDisk
A: model=Cruzer Blade

P: /devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.2/1-1.2:1.0/host6/target6:0:0/6:0:0:0/block/sdb
N: sdb
E: DEVNAME=/dev/sdb
E: DEVTYPE=disk
E: SUBSYSTEM=block
A: removable=1
A: size=131072
A: ro=0
A: dev=8:16
A: diskseq=42
"""


@pytest.mark.umockdev
@pytest.mark.skipif(shutil.which("umockdev-run") is None, reason="umockdev-run is not installed")
def test_list_shows_the_usb_port_path(tmp_path: Path) -> None:
    fixtures = Path(__file__).resolve().parent / "fixtures"
    description = tmp_path / "hub.umockdev"
    description.write_text(HUB_STICK + "\n" + (fixtures / "sata.umockdev").read_text())
    cmd = " ".join(f"'{part}'" for part in popsicle_cmd())
    result = subprocess.run(
        ["umockdev-run", "-d", str(description), "--", "sh", "-c",
         f"{cmd} list --all --json && echo --- && COLUMNS=120 {cmd} list"],
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    as_json, table = result.stdout.split("---\n")
    by_path = {d["path"]: d for d in json.loads(as_json)}
    assert by_path["/dev/sdb"]["port_path"] == "1-1.2"
    assert by_path["/dev/sdb"]["diskseq"] == 42
    assert by_path["/dev/sda"]["port_path"] is None
    header = next(line for line in table.splitlines() if "Device" in line)
    assert "Port" in header
    assert any("/dev/sdb" in line and "1-1.2" in line for line in table.splitlines()), table


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
