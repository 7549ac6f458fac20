"""A drive to be read (a master to clone, a drive to image) held by something else: the rules
of a drive read (:mod:`popsicle_py.master`), the same for ``flash`` from a master and ``read``,
up front and again at the open.

Refused: what can write the drive while it is read (a read-write loop device over it or over
the file it stands on, a swap partition of it).  Not refused: what cannot (a read-only mount,
a read-only loop device over it), which ``read`` refused at the open with the rules of a drive
about to be written ("is mounted at ...", after "reading ... into").
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, needs_root, popsicle_cmd
from loopdev import attach, detach, loop_device

from popsicle_py import master, sysfs
from popsicle_py.identity import LoopKey
from popsicle_py.master import LoopOn

MiB = 1 << 20
PATTERN = 0x5A


def popsicle(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, check=False)


def ext4_drive(loop_factory: Callable[..., Loop], size: int = 16 * MiB) -> Loop:
    drive = loop_factory(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", drive.path], check=True)
    return drive


# --------------------------------------------------------------------------------------------
# The rules, on plain data


def test_a_read_write_loop_over_the_drive_or_its_file_can_write_it() -> None:
    drive, part, other = os.makedev(7, 1), os.makedev(259, 3), os.makedev(8, 0)
    numbers = frozenset({drive, part})
    own = LoopKey(dev=40, ino=7, rdev=0, offset=0)  # the drive: a loop device over a file
    loops = [LoopOn("/dev/loop1", drive, own, False),
             LoopOn("/dev/loop2", os.makedev(7, 2), LoopKey(1, 2, drive, 4096), False),
             LoopOn("/dev/loop3", os.makedev(7, 3), LoopKey(1, 3, part, 0), True),
             LoopOn("/dev/loop4", os.makedev(7, 4), LoopKey(40, 7, 0, 1 << 20), False),
             LoopOn("/dev/loop5", os.makedev(7, 5), LoopKey(40, 8, 0, 0), False),
             LoopOn("/dev/loop6", os.makedev(7, 6), LoopKey(1, 4, other, 0), False)]
    assert master.loops_writing(drive, numbers, loops) == ("/dev/loop2", "/dev/loop4")
    assert master.loop_lines("/dev/loop1", ["/dev/loop2"]) == [
        "/dev/loop1 can be written through /dev/loop2 (a loop device over it or over what it "
        "is stored on, attached read-write): its bytes could change while it is read; detach "
        "it, or attach it read-only (losetup -r)"]
    assert master.loop_lines("/dev/loop1", []) == []


def test_a_mapping_over_the_drive_is_named_as_flash_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``/dev/dm-0`` (or its /dev/mapper link when there is one), never a bare "dm-0", and
    what it is (its uuid's kind)."""
    disk = tmp_path / "devices" / "usb" / "block" / "sdz"
    (disk / "holders" / "dm-0").mkdir(parents=True)
    (tmp_path / "dev" / "block").mkdir(parents=True)
    (tmp_path / "dev" / "block" / "8:240").symlink_to(disk)
    (tmp_path / "class" / "block" / "dm-0" / "dm").mkdir(parents=True)
    (tmp_path / "class" / "block" / "dm-0" / "dm" / "name").write_text(
        "popsicle-test-no-such-mapping\n")
    monkeypatch.setattr(sysfs, "ROOT", str(tmp_path))
    (tmp_path / "class" / "block" / "dm-0" / "dm" / "uuid").write_text("LVM-K2Zq0Yp8\n")
    assert master.holders([os.makedev(8, 240)]) == ("/dev/dm-0 (LVM)",)


# --------------------------------------------------------------------------------------------
# Real drives


@needs_root
def test_a_drive_mounted_read_only_is_read(loop_factory: Callable[..., Loop],
                                          tmp_path: Path) -> None:
    """As the README says (like a master): refused mounted read-write, read-only is fine."""
    drive = ext4_drive(loop_factory)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", "-o", "ro", drive.path, str(mountpoint)], check=True)
    try:
        out = tmp_path / "ro.img"
        result = popsicle("read", drive.path, out)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        # The device's bytes (its backing file): a read-only ext4's journal superblock is
        # changed in the page cache alone, never written, so not what a buffered read says.
        assert out.read_bytes() == drive.read()
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


@needs_root
def test_a_read_only_loop_over_a_drive_does_not_stop_its_read(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    drive = ext4_drive(loop_factory)
    above = attach(drive.path, read_only=True)
    try:
        out = tmp_path / "d.img"
        result = popsicle("read", drive.path, out)
        assert result.returncode == 0, result.stderr
        assert out.read_bytes() == drive.read()
    finally:
        detach(above, drive.path)


@needs_root
def test_a_master_under_a_read_write_loop_is_refused(loop_factory: Callable[..., Loop],
                                                    tmp_path: Path) -> None:
    """Anything written to the loop device lands on the master while it is read: refused
    before anything is written, by flash (which went ahead) and read alike."""
    m = ext4_drive(loop_factory, 8 * MiB)
    a = loop_factory(8 * MiB, fill=PATTERN)
    above = attach(m.path)
    try:
        line = (f"{m.path} can be written through {above} (a loop device over it or over "
                "what it is stored on, attached read-write)")
        result = popsicle("flash", m.path, a.path, "--yes")
        assert result.returncode == 2, result.stderr
        assert line in result.stderr
        assert a.read() == bytes([PATTERN]) * (8 * MiB)
        out = tmp_path / "m.img"
        result = popsicle("read", m.path, out)
        assert result.returncode == 2, result.stderr
        assert line in result.stderr
        assert "reading" not in result.stdout and list(tmp_path.iterdir()) == []
    finally:
        detach(above, m.path)


@needs_root
def test_a_master_over_a_file_another_loop_device_writes_is_refused(
        loop_factory: Callable[..., Loop]) -> None:
    m = ext4_drive(loop_factory, 8 * MiB)
    a = loop_factory(8 * MiB, fill=PATTERN)
    sibling = attach(m.backing)
    try:
        result = popsicle("flash", m.path, a.path, "--yes")
        assert result.returncode == 2, result.stderr
        assert f"{m.path} can be written through {sibling}" in result.stderr
        assert a.read() == bytes([PATTERN]) * (8 * MiB)
    finally:
        detach(sibling, m.backing)


@needs_root
@pytest.mark.skipif(shutil.which("swapon") is None, reason="swapon is not installed")
def test_a_master_with_an_active_swap_partition_is_refused(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """Its first partition mounted read-only (so the whole disk is not free for an exclusive
    open), its second the kernel's swap, which it writes at will."""
    a = loop_factory(16 * MiB, fill=PATTERN)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with loop_device(16 * MiB, partitions=[(2048, 8192), (10240, 8192)]) as m:
        first, second = f"{m.path}p1", f"{m.path}p2"
        subprocess.run(["mkfs.ext4", "-q", "-F", first], check=True)
        subprocess.run(["mkswap", "-q", second], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "ro", first, str(mountpoint)], check=True)
        try:
            subprocess.run(["swapon", second], check=True)
            try:
                result = popsicle("flash", m.path, a.path, "--yes")
                assert result.returncode == 2, result.stderr
                assert f"{m.path} is in use as swap ({second})" in result.stderr
                result = popsicle("read", m.path, tmp_path / "m.img")  # a system drive
                assert result.returncode == 2, result.stderr
                assert "swap" in result.stderr
            finally:
                subprocess.run(["swapoff", second], check=True)
        finally:
            subprocess.run(["umount", str(mountpoint)], check=False)
    assert a.read() == bytes([PATTERN]) * (16 * MiB)
    assert not (tmp_path / "m.img").exists()


@needs_root
def test_read_into_dash_is_refused_not_a_file_named_dash(loop_factory: Callable[..., Loop],
                                                         tmp_path: Path) -> None:
    """``read /dev/sdb - | ...`` (as flash reads ``-``): one line, exit 2, and no file "-"
    (a drive's size of it in the current directory) written."""
    drive = loop_factory(4 * MiB, fill=PATTERN)
    result = subprocess.run([*popsicle_cmd(), "read", drive.path, "-"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("popsicle-py: read writes a file, not standard output (-): name "
                             "a file such as stick.img.zst (and its .sha256 is written beside "
                             "it)\n")
    assert result.stdout == "" and list(tmp_path.iterdir()) == []
