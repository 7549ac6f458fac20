"""A master drive as the source of a flash (issue 28): read once, never a target, held still.

``popsicle-py flash /dev/M /dev/A /dev/B`` clones the drive M.  Loop devices stand for the
drives; the kernel's own counters (/sys/block/*/stat) show how often the master was read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Loop, needs_root, popsicle_cmd
from loopdev import HAVE_UMOCKDEV, in_testbed

from popsicle_py import drives, master
from popsicle_py.master import Counters, MountLine, Writer

needs_umockdev = pytest.mark.skipif(not HAVE_UMOCKDEV, reason="umockdev-run is not installed")
MiB = 1 << 20
HEAD = 64 << 10
PATTERN = 0x5A


# --------------------------------------------------------------------------------------------
# The rules, on plain data


def test_mountinfo_tells_read_write_from_read_only() -> None:
    text = ("36 25 7:3 / /mnt/a\\040b rw,relatime shared:1 - vfat /dev/loop3 rw,fmask=0022\n"
            "37 25 7:4 / /mnt/ro ro,relatime - ext4 /dev/loop4 ro\n"
            "38 25 7:5 / /mnt/bind rw - ext4 /dev/loop5 ro,errors=remount-ro\n"
            "garbage\n")
    mounts = master.parse_mountinfo(text)
    assert mounts == [MountLine(os.makedev(7, 3), "/mnt/a b", True),
                      MountLine(os.makedev(7, 4), "/mnt/ro", False),
                      MountLine(os.makedev(7, 5), "/mnt/bind", False)]
    assert master.rw_mountpoints({os.makedev(7, 3), os.makedev(7, 4)}, mounts) == ("/mnt/a b",)
    assert master.rw_mountpoints({os.makedev(7, 5)}, mounts) == ()


def test_a_write_between_two_readings_is_a_change() -> None:
    before = Counters((80, 0), (4096, 1))
    assert master.change(before, before) is None
    assert master.change(before, Counters((88, 0), (4096, 1))) == "it was written to"
    assert master.change(before, Counters((80, 0), (4096, 2))) == (
        "its backing file was written to")


def test_writers_are_named_in_one_line() -> None:
    assert master.writer_lines("/dev/sdb", []) == []
    assert master.writer_lines("/dev/sdb", [Writer(12, "dd"), Writer(13, "gparted")]) == [
        "/dev/sdb is open for writing by dd (pid 12), gparted (pid 13): its bytes could "
        "change while it is read; close it first"]


# --------------------------------------------------------------------------------------------
# Real drives


def read_sectors(loop: Loop) -> int:
    return int(Path(f"/sys/dev/block/{loop.major_minor[0]}:{loop.major_minor[1]}/stat")
               .read_text().split()[2])


def make_master(loop_factory: Callable[..., Loop], size: int, fs: str = "vfat"
                ) -> tuple[Loop, bytes]:
    """A drive holding a file system over random bytes (what sanity accepts as a disk)."""
    m = loop_factory(size)
    with open(m.backing, "r+b") as f:
        f.write(os.urandom(size))
    mkfs = ["mkfs.vfat", "-n", "MASTER"] if fs == "vfat" else ["mkfs.ext4", "-q", "-F"]
    subprocess.run([*mkfs, m.path], check=True, capture_output=True)
    subprocess.run(["blockdev", "--flushbufs", m.path], check=True)
    return m, m.read()


def flash(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), "flash", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, check=False, **kwargs)


@needs_root
def test_a_master_is_copied_to_every_drive_and_read_once(
        loop_factory: Callable[..., Loop]) -> None:
    size = 32 * MiB
    m, data = make_master(loop_factory, size)
    a, b = loop_factory(size, fill=PATTERN), loop_factory(size + MiB, fill=PATTERN)
    before = read_sectors(m)
    result = flash(m.path, a.path, b.path, "--yes", "--json", "--bucket-size", "1M")
    assert result.returncode == 0, result.stderr
    read = (read_sectors(m) - before) * 512
    # Once: the whole drive, plus the head read to recognise it (and readahead), never twice.
    assert size <= read < size + 4 * MiB, read
    assert a.read() == data and b.read(size) == data
    summary = json.loads(result.stdout.splitlines()[-1])
    assert [r["status"] for r in summary["results"]] == ["ok", "ok"]


@needs_root
def test_the_master_named_as_a_target_too_is_refused(loop_factory: Callable[..., Loop]) -> None:
    m, data = make_master(loop_factory, 8 * MiB)
    a = loop_factory(8 * MiB, fill=PATTERN)
    result = flash(m.path, a.path, m.path, "--yes")
    assert result.returncode == 2, result.stderr
    assert f"{m.path} holds the image being written" in result.stderr
    assert m.read() == data and a.read() == bytes([PATTERN]) * (8 * MiB)


@pytest.fixture
def mount_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    subprocess.run(["umount", str(path)], capture_output=True, check=False)


@needs_root
def test_a_mounted_master_is_refused_read_write_and_read_only(
        loop_factory: Callable[..., Loop], mount_dir: Path) -> None:
    """Read-only was taken, and the copies held the kernel's view of the master: ext4 changes
    its journal's superblock in memory even mounted read-only, so six bytes of every copy
    differed from the master's own, and verify (through the same cache) said ok."""
    m, _ = make_master(loop_factory, 8 * MiB, "ext4")
    a = loop_factory(8 * MiB, fill=PATTERN)
    subprocess.run(["mount", m.path, str(mount_dir)], check=True)
    result = flash(m.path, a.path, "--yes")
    assert result.returncode == 2, result.stderr
    assert (f"{m.path} is mounted read-write at {mount_dir}: its bytes could change while it "
            "is read; unmount it\n") in result.stderr
    assert a.read() == bytes([PATTERN]) * (8 * MiB)
    subprocess.run(["mount", "-o", "remount,ro", str(mount_dir)], check=True)
    result = flash(m.path, a.path, "--yes")
    assert result.returncode == 2, result.stderr
    assert (f"{m.path} is mounted read-only at {mount_dir}: a mounted file system's blocks in "
            "memory can differ from the drive's (ext4 changes its journal's even read-only), "
            "and the copies would hold those; unmount it first") in result.stderr
    assert a.read() == bytes([PATTERN]) * (8 * MiB)
    subprocess.run(["umount", str(mount_dir)], check=True)
    result = flash(m.path, a.path, "--yes")
    assert result.returncode == 0, result.stderr
    assert a.read() == Path(m.backing).read_bytes()  # the drive's own bytes


@needs_root
def test_a_master_open_for_writing_is_refused(loop_factory: Callable[..., Loop]) -> None:
    m, _ = make_master(loop_factory, 8 * MiB)
    a = loop_factory(8 * MiB, fill=PATTERN)
    holder = subprocess.Popen(["sh", "-c", f"exec 3<>{m.path}; echo ready; exec sleep 60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        result = flash(m.path, a.path, "--yes")
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr
    assert f"{m.path} is open for writing by sleep (pid {holder.pid})" in result.stderr
    assert a.read() == bytes([PATTERN]) * (8 * MiB)


def flash_written_meanwhile(m: Loop, targets: list[Loop], add: Callable[[int], None],
                           offset: int, *, synced: bool) -> tuple[int, str, str]:
    """Clone ``m`` to ``targets`` (``add`` throttles the run) and write 4 KiB at ``offset`` of
    the master at the first progress, through the page cache, fsync'ed or not."""
    proc = subprocess.Popen(
        [*popsicle_cmd(), "flash", m.path, *(t.path for t in targets), "--yes", "--json",
         "--bucket-size", "1M", "--buckets", "2", "--no-probe"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        preexec_fn=lambda: add(os.getpid()))
    assert proc.stdout is not None
    for line in proc.stdout:
        if json.loads(line)["event"] == "progress":  # the master is being read
            fd = os.open(m.path, os.O_WRONLY)
            try:
                os.pwrite(fd, b"changed!" * 512, offset)
                if synced:
                    os.fsync(fd)
            finally:
                os.close(fd)
            break
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def assert_every_drive_failed(m: Loop, targets: list[Loop], out: str) -> None:
    summary = json.loads(out.splitlines()[-1])
    for t in targets:
        r = next(r for r in summary["results"] if r["device"] == t.path)
        assert r["status"] == "failed" and r["cause"] == "source", r
        assert f"the master drive {m.path} changed while it was read" in r["error"], r


@needs_root
def test_a_master_written_while_it_is_read_fails_every_drive(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Any]) -> None:
    m, data = make_master(loop_factory, 24 * MiB)
    targets = [loop_factory(24 * MiB, fill=PATTERN) for _ in range(2)]
    status, out, err = flash_written_meanwhile(
        m, targets, throttle(*((t, 4 * MiB) for t in targets)), 20 * MiB, synced=True)
    assert status == 1, err
    assert_every_drive_failed(m, targets, out)
    for t in targets:
        assert t.read(HEAD) != data[:HEAD]


@needs_root
def test_a_master_written_through_the_page_cache_while_it_is_read_fails_every_drive(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Any]) -> None:
    """A buffered write (dd without oflag=direct) into what was already read sits in the page
    cache, uncounted by the kernel until written back: the check writes it back first."""
    m, _ = make_master(loop_factory, 24 * MiB)
    targets = [loop_factory(24 * MiB, fill=PATTERN) for _ in range(2)]
    status, out, err = flash_written_meanwhile(  # the master's first MiB is read: write in it
        m, targets, throttle(*((t, 4 * MiB) for t in targets)), 8192, synced=False)
    assert status == 1, err
    assert_every_drive_failed(m, targets, out)


WATCH_RULE = """
import json, sys, pyudev
from popsicle_py import drives, watch
device = pyudev.Devices.from_device_file(pyudev.Context(), sys.argv[1])
drive = drives.build_drive(device, drives.gather_facts(sys.argv[1]), explicit=False)
print(json.dumps(watch.ineligibility(drive, None, 1 << 40)))
"""


@needs_root
def test_watch_leaves_the_master_alone(loop_factory: Callable[..., Loop]) -> None:
    """The rule watch applies to every drive that appears, with the master as its image."""
    m, _ = make_master(loop_factory, 8 * MiB)
    out = subprocess.run([sys.executable, "-c", WATCH_RULE, m.path], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == drives.REASON_IMAGE


ALL_USB_MASTER = """
import json
from popsicle_py.plan import make_plan
plan = make_plan([], all_usb=True, image_path="/dev/sdb", image_size=10**6, unmount=False)
print(json.dumps({"targets": [d.path for d in plan.targets], "notes": list(plan.notes)}))
"""


@needs_umockdev
@pytest.mark.umockdev
def test_all_usb_skips_the_master(tmp_path: Path) -> None:
    result = in_testbed(["usb-stick.umockdev", "sd-builtin.umockdev"], ALL_USB_MASTER, tmp_path)
    assert result == {"targets": ["/dev/mmcblk0"],
                      "notes": ["skipped /dev/sdb (SanDisk Cruzer Blade, 14.3 GiB): holds the "
                                "image"]}
