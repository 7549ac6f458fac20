"""Every holder of a target seen before anything is written (issue 25, items 1 and 2).

Real parts only: loop devices, a loop "window" over a target (``losetup --offset``) mounted in
a private mount namespace (``unshare -m``), processes holding a target open (``sleep 60 <
/dev/loopN``), and ``--report`` pointed through symlinks at a block device and at a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Loop, popsicle_cmd
from loopdev import (
    DROP_OTHER_TESTS_MOUNTS,
    is_mounted,
    loop_device,
    mounted_elsewhere,
    new_mount_namespace,
    partition_paths,
)
from loopdev import run as run_tool

from popsicle_py.drives import (
    LoopOver,
    Mount,
    Opener,
    Process,
    SystemFacts,
    holder_reasons,
    mount_table,
    writer_reasons,
)

MiB = 1 << 20
PATTERN = 0xA5


def popsicle(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, check=False)


def refusal(done: subprocess.CompletedProcess[str]) -> str:
    """The one line of a refusal, without the program's name."""
    return done.stderr.strip().removeprefix("popsicle-py: ")


def image(tmp_path: Path, size: int = MiB) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    return path, data


@contextlib.contextmanager
def window(target: str, offset: int, size: int) -> Iterator[str]:
    """A loop device over part of ``target`` (``losetup -o OFFSET --sizelimit N``)."""
    path = run_tool("losetup", "-f", "--show", "-o", str(offset), "--sizelimit", str(size),
                    target).strip()
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", path], capture_output=True, check=False)


@contextlib.contextmanager
def holding(path: str, flags: int = os.O_RDONLY) -> Iterator[subprocess.Popen[bytes]]:
    """A ``sleep 60`` holding ``path`` open on its stdin (no O_EXCL), as ``< /dev/loopN`` does
    (or ``<> /dev/loopN`` with O_RDWR); open before this returns, killed afterwards."""
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        proc = subprocess.Popen(["sleep", "60"], stdin=fd)
    finally:
        os.close(fd)  # the child has it from here on; our own descriptors never count
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.root
def test_a_loop_window_mounted_in_another_namespace_is_seen(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    path, _ = image(tmp_path)
    target = loop_factory(64 * MiB, fill=PATTERN)
    with window(target.path, MiB, 32 * MiB) as win:
        run_tool("mkfs.ext4", "-q", win)
        before = target.read()
        with mounted_elsewhere(win, tmp_path / "mnt") as holder:
            assert str(tmp_path / "mnt") not in Path("/proc/self/mountinfo").read_text()
            for extra in ([], ["--unmount"]):
                done = popsicle("flash", path, target.path, "--yes", *extra)
                assert done.returncode == 2, done.stderr
                assert (f"{target.path} is mounted at {tmp_path / 'mnt'} ({win}) in the mount "
                        f"namespace of pid {holder.pid} (sleep)") in done.stderr, done.stderr
                assert f"{target.path} is in use by {win}, a loop device over it at offset" \
                       f" {MiB}" in done.stderr, done.stderr
                assert target.read() == before


@pytest.mark.root
def test_the_target_mounted_in_another_namespace_is_refused_even_with_unmount(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    path, _ = image(tmp_path)
    target = loop_factory(32 * MiB)
    run_tool("mkfs.ext4", "-q", target.path)
    before = target.read()
    with mounted_elsewhere(target.path, tmp_path / "mnt") as holder:
        done = popsicle("flash", path, target.path, "--yes", "--unmount")
        assert done.returncode == 2, done.stderr
        assert refusal(done) == (
            f"{target.path} is mounted at {tmp_path / 'mnt'} in the mount namespace of pid "
            f"{holder.pid} (sleep), not ours: unmount it there"
        ), done.stderr
        assert target.read() == before


@pytest.mark.root
def test_a_loop_device_over_the_target_at_an_offset_is_refused(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    path, _ = image(tmp_path)
    target = loop_factory(8 * MiB, fill=PATTERN)
    with window(target.path, 2 * MiB, 2 * MiB) as win:
        done = popsicle("flash", path, target.path, "--yes")
        assert done.returncode == 2, done.stderr
        assert refusal(done) == (f"{target.path} is in use by {win}, a loop device over"
                                       f" it at offset {2 * MiB}"), done.stderr
    assert target.read() == bytes([PATTERN]) * target.size


@pytest.mark.root
def test_a_reader_holding_the_target_open_is_named(loop_factory: Callable[..., Loop],
                                                   tmp_path: Path) -> None:
    path, _ = image(tmp_path)
    target = loop_factory(4 * MiB, fill=PATTERN)
    with holding(target.path) as reader:
        done = popsicle("flash", path, target.path, "--yes")
        assert done.returncode == 2, done.stderr
        assert refusal(done) == f"{target.path} is open in sleep (pid {reader.pid})", \
            done.stderr
        probed = popsicle("probe", target.path, "--yes")
        assert probed.returncode == 2, probed.stderr
        assert f"is open in sleep (pid {reader.pid})" in probed.stderr
    assert target.read() == bytes([PATTERN]) * target.size


@pytest.mark.root
def test_a_process_holding_a_partition_or_a_loop_over_the_target_holds_it(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    path, _ = image(tmp_path)
    target = loop_factory(8 * MiB, fill=PATTERN)
    with window(target.path, 0, 4 * MiB) as win, holding(win) as reader:
        done = popsicle("flash", path, target.path, "--yes")
        assert done.returncode == 2, done.stderr
        assert f"{target.path} is open in sleep (pid {reader.pid}) through {win}" \
            in done.stderr, done.stderr
    assert target.read() == bytes([PATTERN]) * target.size


@pytest.mark.root
def test_a_process_holding_a_partition_of_the_target_holds_it(tmp_path: Path) -> None:
    path, _ = image(tmp_path)
    with loop_device(8 * MiB, partitions=[(2048, 4096)]) as target:
        before = target.read()
        with holding(f"{target.path}p1") as reader:
            done = popsicle("flash", path, target.path, "--yes")
            assert done.returncode == 2, done.stderr
            assert refusal(done) == (f"{target.path} is open in sleep (pid {reader.pid})"
                                     f" through {target.path}p1"), done.stderr
        assert target.read() == before


@pytest.mark.root
def test_verify_says_busy_for_a_drive_another_program_writes_and_reads_past_readers(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    path, data = image(tmp_path)
    target = loop_factory(4 * MiB)
    with open(target.backing, "r+b") as f:
        f.write(data)
    with holding(target.path, os.O_RDWR) as writer:
        done = popsicle("verify", path, target.path)
        assert done.returncode == 2, done.stderr
        assert refusal(done) == (f"{target.path} is busy: open for writing in sleep "
                                       f"(pid {writer.pid})"), done.stderr
    with holding(target.path) as _reader:
        done = popsicle("verify", path, target.path)
        assert done.returncode == 0, done.stderr


@pytest.mark.root
@pytest.mark.parametrize("kind", ["block device", "file"])
def test_a_report_through_a_symlink_is_refused_and_nothing_is_written(
        loop_factory: Callable[..., Loop], tmp_path: Path, kind: str) -> None:
    path, _ = image(tmp_path)
    target = loop_factory(2 * MiB, fill=PATTERN)
    victim = loop_factory(2 * MiB, fill=0x5A)
    other = tmp_path / "other.csv"
    other.write_text("keep me\n")
    link = tmp_path / "run.csv"
    link.symlink_to(victim.path if kind == "block device" else other)
    done = popsicle("flash", path, target.path, "--yes", "--report", link)
    assert done.returncode == 2, done.stderr
    assert refusal(done) == (f"--report {link}: is a symbolic link; name the file "
                                   "itself"), done.stderr
    assert target.read() == bytes([PATTERN]) * target.size
    assert victim.read() == bytes([0x5A]) * victim.size
    assert other.read_text() == "keep me\n"


@pytest.mark.root
def test_a_report_that_is_a_device_node_is_refused(loop_factory: Callable[..., Loop],
                                                   tmp_path: Path) -> None:
    path, _ = image(tmp_path)
    target = loop_factory(2 * MiB, fill=PATTERN)
    victim = loop_factory(2 * MiB, fill=0x5A)
    node = tmp_path / "run.csv"
    os.mknod(node, 0o600 | 0o060000, victim.devnum)  # S_IFBLK
    done = popsicle("flash", path, target.path, "--yes", "--report", node)
    assert done.returncode == 2, done.stderr
    assert refusal(done) == (f"--report {node}: is a block device, not a regular file"), \
        done.stderr
    assert target.read() == bytes([PATTERN]) * target.size
    assert victim.read() == bytes([0x5A]) * victim.size


@pytest.mark.root
def test_a_copy_that_follows_our_unmount_is_unmounted_with_ours(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """A namespace cloned as a slave of ours (systemd services on a desktop, where every
    mount is shared) loses the mount when we unmount it: --unmount is enough."""
    path, data = image(tmp_path)
    target = loop_factory(32 * MiB)
    run_tool("mkfs.ext4", "-q", target.path)
    base = tmp_path / "base"
    base.mkdir()
    run_tool("mount", "-t", "tmpfs", "tmpfs", str(base))
    own = base / "own"
    try:
        run_tool("mount", "--make-shared", str(base))  # as systemd makes every mount
        own.mkdir()
        run_tool("mount", target.path, str(own))
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "slave", "sh", "-c",
                                 DROP_OTHER_TESTS_MOUNTS + "echo ready && exec sleep 60"],
                                stdout=subprocess.PIPE,
                                text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            assert str(own) in Path(f"/proc/{proc.pid}/mountinfo").read_text()
            done = popsicle("flash", path, target.path, "--yes")
            assert done.returncode == 2, done.stderr
            assert refusal(done) == f"{target.path} is mounted at {own}; use --unmount to " \
                                    "unmount it", done.stderr
            done = popsicle("flash", path, target.path, "--yes", "--unmount")
            assert done.returncode == 0, done.stderr
            assert target.read(len(data)) == data
        finally:
            proc.kill()
            proc.wait(timeout=10)
    finally:
        subprocess.run(["umount", "-l", str(own)], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(base)], capture_output=True, check=False)


# -- the rules over plain facts -----------------------------------------------------------------

DISK, PART, WINDOW, OTHER = (os.makedev(8, 16), os.makedev(8, 17), os.makedev(7, 9),
                             os.makedev(8, 32))


def test_holder_reasons_name_each_holder_over_plain_facts() -> None:
    sleep, dd = Process(1234, "sleep"), Process(42, "dd")
    facts = SystemFacts(
        foreign_mounts=(Mount("/dev/loop9", "/mnt", frozenset({WINDOW, DISK}),
                              namespace=sleep, sources=frozenset({WINDOW})),
                        Mount("/dev/sdb", "/srv", frozenset({DISK}), namespace=sleep,
                              sources=frozenset({DISK})),
                        Mount("/dev/sdc", "/data", frozenset({OTHER}), namespace=sleep)),
        loops=(LoopOver("/dev/loop9", WINDOW, 1 << 20, frozenset({DISK})),),
        openers=(Opener(dd, "/dev/sdb1", PART, frozenset({PART, DISK}), writing=False),
                 Opener(sleep, "/dev/sdb", DISK, frozenset({DISK}), writing=True),
                 Opener(dd, "/dev/sdc", OTHER, frozenset({OTHER}), writing=True)))
    advice = ", not ours: unmount it there"
    assert holder_reasons(DISK, facts) == (
        f"mounted at /mnt (/dev/loop9) in the mount namespace of pid 1234 (sleep){advice}",
        f"mounted at /srv in the mount namespace of pid 1234 (sleep){advice}",
        "in use by /dev/loop9, a loop device over it at offset 1048576",
        "open in dd (pid 42) through /dev/sdb1",
        "open in sleep (pid 1234)")
    assert writer_reasons(DISK, facts) == ("open for writing in sleep (pid 1234)",)
    # The window itself is not held by the loop device it is.
    assert holder_reasons(WINDOW, facts) == (
        f"mounted at /mnt in the mount namespace of pid 1234 (sleep){advice}",)


def test_udev_reading_a_fresh_stick_is_no_holder() -> None:
    """udev's worker opens every disk that appears, read-only, to read its signatures: a
    station or watch that refused such a stick would lose sticks at random (seen in the VM)."""
    worker, sleep = Process(221, "(udev-worker)"), Process(1234, "sleep")
    probing = Opener(worker, "/dev/sdb", DISK, frozenset({DISK}), writing=False)
    assert holder_reasons(DISK, SystemFacts(openers=(probing,))) == ()
    writing = Opener(worker, "/dev/sdb", DISK, frozenset({DISK}), writing=True)
    assert holder_reasons(DISK, SystemFacts(openers=(writing,))) == (
        "open in (udev-worker) (pid 221)",)
    reader = Opener(sleep, "/dev/sdb", DISK, frozenset({DISK}), writing=False)
    assert holder_reasons(DISK, SystemFacts(openers=(probing, reader))) == (
        "open in sleep (pid 1234)",)


def test_mount_propagation_is_read_from_mountinfo() -> None:
    text = ("46 27 0:41 / /base rw shared:1 - tmpfs tmpfs rw\n"
            "47 46 8:17 / /base/own rw shared:2 master:5 - ext4 /dev/sdb1 rw\n")
    base, own = mount_table(text)
    assert (base.mount_id, base.parent_id, base.shared, base.master) == (46, 27, 1, None)
    assert (own.mount_id, own.parent_id, own.shared, own.master) == (47, 46, 2, 5)


@pytest.mark.root
def test_verify_of_a_drive_another_popsicle_py_is_writing_says_busy(
        faulty_drive: Callable[..., Any], tmp_path: Path) -> None:
    """Not "differs at byte 0": what verify would compare is being written."""
    path, _ = image(tmp_path, 8 * MiB)
    drive = faulty_drive(16 * MiB, crawl=(0, MiB))  # a writer that stays busy (8 s)
    writer = subprocess.Popen([*popsicle_cmd(), "flash", str(path), drive.path, "--yes",
                               "--json", "--no-probe"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
    try:
        assert writer.stdout is not None
        for line in writer.stdout:
            event = json.loads(line)
            if event.get("event") == "progress" and event.get("phase") == "writing":
                break
        done = popsicle("verify", path, drive.path)
        assert done.returncode == 2, done.stdout + done.stderr
        assert refusal(done) == (f"{drive.path} is busy: open for writing in "
                                 f"{Path(f'/proc/{writer.pid}/comm').read_text().strip()} "
                                 f"(pid {writer.pid})"), done.stderr
    finally:
        drive.clear()  # its write in flight need not hold the stop
        writer.send_signal(signal.SIGINT)
        writer.wait(timeout=60)


@pytest.mark.root
def test_a_holder_that_comes_after_the_plan_is_refused_just_before_the_first_write(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    from popsicle_py import app
    from popsicle_py.errors import Refused
    from popsicle_py.signals import Cancellation
    from popsicle_py.view import PlainView

    path, _ = image(tmp_path)
    target = loop_factory(4 * MiB, fill=PATTERN)
    request = app.FlashRequest(app.SourceOptions(str(path)),
                               app.TargetOptions(devices=(target.path,)))
    job = app.prepare_flash(request)  # nobody holds it yet: the plan passes
    with job, holding(target.path) as reader, pytest.raises(Refused) as refused:
        job.run(PlainView(), Cancellation())
    assert refused.value.lines == [f"{target.path} is open in sleep (pid {reader.pid})"]
    assert target.read() == bytes([PATTERN]) * target.size


@pytest.mark.root
def test_a_station_journal_through_a_symlink_to_a_disk_is_refused(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    from popsicle_py.station import journal

    victim = loop_factory(2 * MiB, fill=0x5A)
    link = tmp_path / "journal.sqlite"
    link.symlink_to(victim.path)
    with pytest.raises(journal.JournalError, match="is a symbolic link"):
        journal.connect(str(link), create=True)
    assert victim.read() == bytes([0x5A]) * victim.size


@pytest.mark.root
def test_a_holder_of_another_device_costs_no_second_look(
        loop_factory: Callable[..., Loop], monkeypatch: pytest.MonkeyPatch) -> None:
    """The second look at the open descriptors (SETTLE later) is for the targets' holders:
    a process holding some other device (another program's loop device) delays nothing."""
    from popsicle_py.drives import holders, openers

    target, other = loop_factory(MiB), loop_factory(MiB)
    looks: list[int] = []
    scan = holders._scan_openers
    monkeypatch.setattr(holders, "_scan_openers",
                        lambda answers: looks.append(1) or scan(answers))
    with holding(other.path) as stranger:
        found = openers(frozenset({target.devnum}))
        assert len(looks) == 1
        assert stranger.pid in {o.process.pid for o in found}  # seen, never a reason for it
        with holding(target.path) as reader:
            looks.clear()
            found = openers(frozenset({target.devnum}))
            assert len(looks) == 2
            assert reader.pid in {o.process.pid for o in found if target.devnum in o.devnums}


def test_a_descriptor_closed_while_it_is_looked_at_is_no_writer() -> None:
    """A udev worker probes a stick with descriptors it closes at once: one gone between the
    look at /proc/PID/fd and the read of its flags was taken for a writer (flags unknown),
    and a stick just plugged in was refused "open in (udev-worker)" in the VM."""
    from popsicle_py.drives import opened

    with open("/dev/null", "rb") as null, subprocess.Popen(["sleep", "60"], stdin=null) as sleeper:
        try:
            assert opened.fdinfo(sleeper.pid, "999") is None  # no such descriptor (now)
            info = opened.fdinfo(sleeper.pid, "0")  # its stdin, read-only
            assert info is not None and info[0] is False
        finally:
            sleeper.kill()


# -- holders found however they hold the drive (review s11, items 3, 4, 6 and 7) ------------


@pytest.mark.root
def test_a_program_holding_the_target_through_a_node_outside_dev_is_seen(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """A node made with mknod anywhere (a chroot's or container's /dev, a tool's private
    node) opens the same drive: its name says nothing, its file does."""
    path, _ = image(tmp_path)
    target = loop_factory(4 * MiB, fill=PATTERN)
    node = tmp_path / "node3"
    os.mknod(node, 0o600 | stat.S_IFBLK, target.devnum)
    with holding(str(node)) as reader:
        done = popsicle("flash", path, target.path, "--yes")
        assert done.returncode == 2, done.stderr
        assert refusal(done) == f"{target.path} is open in sleep (pid {reader.pid})", \
            done.stderr
    assert target.read() == bytes([PATTERN]) * target.size


@pytest.mark.root
def test_a_node_in_a_container_s_own_dev_is_seen(loop_factory: Callable[..., Loop],
                                                 tmp_path: Path) -> None:
    """A container's /dev is a tmpfs of its own mount namespace, in no table of ours: the
    descriptor's file system is looked up in that namespace's mountinfo."""
    path, _ = image(tmp_path)
    target = loop_factory(4 * MiB, fill=PATTERN)
    private = tmp_path / "dev"
    private.mkdir()
    major, minor = target.major_minor
    holder = subprocess.Popen(
        [*new_mount_namespace(), "sh", "-c", DROP_OTHER_TESTS_MOUNTS
         + f"mount -t tmpfs tmpfs {private} && mknod {private}/disk b {major} {minor} && "
         f"echo ready && exec sleep 60 < {private}/disk"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        done = popsicle("flash", path, target.path, "--yes")
        assert done.returncode == 2, done.stderr
        assert refusal(done) == f"{target.path} is open in sleep (pid {holder.pid})", \
            done.stderr
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert target.read() == bytes([PATTERN]) * target.size


MAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDWR)
address = libc.mmap(None, 4096, 3, 1, fd, 0)  # PROT_READ | PROT_WRITE, MAP_SHARED
assert address not in (None, ctypes.c_void_p(-1).value)
os.close(fd)
print("ready", flush=True)
sys.stdin.read()  # until the test is done
"""


@pytest.mark.root
def test_a_program_with_the_target_mapped_and_its_descriptor_closed_is_seen(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """``mmap(MAP_SHARED)`` then ``close(fd)``: no descriptor left, and it can still write
    into the drive whenever it likes (/proc/PID/maps shows it)."""
    path, _ = image(tmp_path)
    target = loop_factory(4 * MiB, fill=PATTERN)
    mapper = subprocess.Popen([sys.executable, "-c", MAPPER, target.path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert mapper.stdout is not None and mapper.stdout.readline().strip() == "ready"
        assert not any(os.readlink(f"/proc/{mapper.pid}/fd/{fd}") == target.path
                       for fd in os.listdir(f"/proc/{mapper.pid}/fd"))
        program = Path(f"/proc/{mapper.pid}/comm").read_text().strip()
        done = popsicle("flash", path, target.path, "--yes")
        assert done.returncode == 2, done.stderr
        assert refusal(done) == f"{target.path} is open in {program} (pid {mapper.pid})", \
            done.stderr
        assert target.read() == bytes([PATTERN]) * target.size
    finally:
        mapper.kill()
        mapper.wait(timeout=10)


@pytest.mark.root
def test_a_program_writing_a_loop_target_s_backing_file_holds_it(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """A virtual machine using the file as its disk writes the drive's bytes as surely as a
    program with the loop device open."""
    path, _ = image(tmp_path)
    target = loop_factory(4 * MiB, fill=PATTERN)
    with holding(str(target.backing), os.O_RDWR) as vm:
        done = popsicle("flash", path, target.path, "--yes")
        assert done.returncode == 2, done.stderr
        assert refusal(done) == (f"{target.path} is open in sleep (pid {vm.pid}) through "
                                 f"{target.backing}"), done.stderr
    assert target.read() == bytes([PATTERN]) * target.size


@contextlib.contextmanager
def lazily_unmounted(target: str, mountpoint: Path) -> Iterator[str]:
    """A file system on ``target`` still used by a loop device over a file on it, then
    unmounted with ``umount -l``: no mount table lists it, no program has the drive open,
    and the kernel still holds it (O_EXCL).  Yields that loop device."""
    run_tool("mkfs.ext4", "-q", target)
    mountpoint.mkdir()
    run_tool("mount", target, str(mountpoint))
    inner = ""
    try:
        with open(mountpoint / "disk.bin", "wb") as f:
            f.truncate(MiB)
        run_tool("mount", "-o", "remount,ro", str(mountpoint))  # nothing written from here on
        inner = run_tool("losetup", "-f", "--show", "-r", str(mountpoint / "disk.bin")).strip()
        run_tool("umount", "-l", str(mountpoint))
        yield inner
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
        if inner:
            subprocess.run(["losetup", "-d", inner], capture_output=True, check=False)


@pytest.mark.root
def test_a_drive_held_by_a_lazily_unmounted_file_system_is_refused_before_confirming(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    path, _ = image(tmp_path)
    target = loop_factory(32 * MiB)
    with lazily_unmounted(target.path, tmp_path / "mnt") as inner:
        before = target.read()
        done = popsicle("flash", path, target.path, "--yes")
        assert done.returncode == 2, done.stderr
        assert refusal(done) == (
            f"{target.path} is in use by {inner}, a loop device over a file on it (its file "
            "system is mounted nowhere: unmounted with `umount -l` while in use?)"), done.stderr
        assert target.read() == before


@pytest.mark.root
def test_a_mounted_drive_a_loop_device_uses_is_not_told_to_use_unmount(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """Mounted, and a loop device over a file on it: the first line advised --unmount, which
    then failed on that loop device after the question.  The lines say what holds it."""
    path, _ = image(tmp_path)
    target = loop_factory(32 * MiB)
    mountpoint = tmp_path / "mnt"
    run_tool("mkfs.ext4", "-q", target.path)
    mountpoint.mkdir()
    run_tool("mount", target.path, str(mountpoint))
    inner = ""
    try:
        (mountpoint / "disk.bin").write_bytes(bytes(MiB))
        inner = run_tool("losetup", "-f", "--show", "-r", str(mountpoint / "disk.bin")).strip()
        done = popsicle("flash", path, target.path, "--yes")
    finally:
        if inner:
            subprocess.run(["losetup", "-d", inner], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert f"popsicle-py: {target.path} is mounted at {mountpoint}" in lines, lines
    assert (f"popsicle-py: {target.path} is in use by {inner}, a loop device over "
            f"{mountpoint}/disk.bin, a file on it (its file system cannot be unmounted while "
            "it is used)") in lines, lines
    assert "--unmount" not in done.stderr, lines


@pytest.mark.root
def test_unmount_is_not_done_for_a_drive_one_of_whose_partitions_the_kernel_holds(
        tmp_path: Path) -> None:
    """``--unmount`` unmounted the first partition, and then the exclusive open was refused
    by what held the second (mounted nowhere): the refusal came after the unmount."""
    path, _ = image(tmp_path)
    with loop_device(64 * MiB, partitions=[(2048, 32768), (34816, 94208)]) as target:
        first, second = partition_paths(target)
        run_tool("mkfs.ext4", "-q", first)
        mounted = tmp_path / "first"
        mounted.mkdir()
        run_tool("mount", "-o", "ro", first, str(mounted))
        try:
            with lazily_unmounted(second, tmp_path / "second") as inner:
                done = popsicle("flash", "--unmount", path, target.path, "--yes")
                assert done.returncode == 2, done.stderr
                assert refusal(done) == (
                    f"{target.path} is in use by {inner}, a loop device over a file on it (its "
                    "file system is mounted nowhere: unmounted with `umount -l` while in use?)"
                ), done.stderr
                assert is_mounted(str(mounted)), "unmounted, then refused"
        finally:
            subprocess.run(["umount", "-l", str(mounted)], capture_output=True, check=False)


@pytest.mark.root
def test_a_drive_the_kernel_holds_when_it_is_opened_gets_true_words(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """Held between the checks and the exclusive open: the line names what may hold it, and
    no program does."""
    from popsicle_py import app
    from popsicle_py.errors import Refused
    from popsicle_py.signals import Cancellation
    from popsicle_py.view import PlainView

    path, _ = image(tmp_path)
    target = loop_factory(32 * MiB)
    request = app.FlashRequest(app.SourceOptions(str(path)),
                               app.TargetOptions(devices=(target.path,)))
    job = app.prepare_flash(request)  # nobody holds it yet: the plan passes
    with job, lazily_unmounted(target.path, tmp_path / "mnt"), pytest.raises(Refused) as refused:
        before = target.read()
        job.run(PlainView(), Cancellation())
    assert target.read() == before
    assert refused.value.lines == [
        f"{target.path}: the drive is busy: in exclusive use by a program (see which with "
        f"`fuser -v {target.path}*`) or by the kernel (a file system on it unmounted with "
        "`umount -l` while in use, a loop device over a file on it); close it and try again"]


@pytest.mark.root
def test_a_file_held_on_a_hung_share_never_hangs_the_look(loop_factory: Callable[..., Loop],
                                                          tmp_path: Path) -> None:
    """A program writing a file on a FUSE share whose daemon is stopped: its file is stat()ed
    on a worker that never returns, the look ends all the same, a second look does not wait
    for it again, and a holder elsewhere is still found."""
    from faulty import FaultyFile

    from popsicle_py.drives import opened

    target = loop_factory(MiB)
    share = FaultyFile(MiB, attr_timeout=0)  # every stat asks the daemon
    try:
        inode = os.stat(share.file)
        wanted = frozenset({(inode.st_dev, inode.st_ino)})  # as if a loop device stood on it
        with holding(share.file, os.O_RDWR) as writer, holding(target.path) as reader:
            # While it answers.  Under load a stat slower than STEP is taken for hung until
            # it returns: looked at again, once the share answered us too.
            deadline = time.monotonic() + 20
            while writer.pid not in {h.pid for h in opened.held(wanted)}:
                assert time.monotonic() < deadline, "the writer never seen while it answers"
                os.stat(share.file)
            os.kill(share.pid, signal.SIGSTOP)
            try:
                for _ in range(2):
                    looks: list[list[opened.Held]] = []
                    look = threading.Thread(target=lambda found=looks: found.append(
                        opened.held(wanted)), daemon=True)
                    look.start()
                    look.join(timeout=30)
                    assert looks, "the look hung"
                    pids = {h.pid for h in looks[0]}
                    assert reader.pid in pids and writer.pid not in pids
            finally:
                os.kill(share.pid, signal.SIGCONT)
    finally:
        share.close()


@pytest.mark.root
def test_a_holder_after_many_hung_shares_is_still_refused(loop_factory: Callable[..., Loop],
                                                          tmp_path: Path) -> None:
    """Programs holding files on five shares whose daemons are stopped (each stat given up
    after its step, the look ended after its deadline), then a reader of the target: the
    files not looked at are judged by their names, and the reader is still found.  (Before:
    the look ended with the reader never looked at, and the drive was written, ok.)"""
    from faulty import FaultyFile

    path, _ = image(tmp_path)
    target = loop_factory(4 * MiB, fill=PATTERN)
    shares = [FaultyFile(MiB, attr_timeout=0) for _ in range(5)]
    try:
        with contextlib.ExitStack() as held:
            for share in shares:  # lower pids than the reader: looked at first
                held.enter_context(holding(share.file))
            reader = held.enter_context(holding(target.path))
            for share in shares:
                os.kill(share.pid, signal.SIGSTOP)
            try:
                done = popsicle("flash", path, target.path, "--yes", "--no-probe")
            finally:
                for share in shares:
                    os.kill(share.pid, signal.SIGCONT)
            assert done.returncode == 2, done.stderr
            assert refusal(done) == f"{target.path} is open in sleep (pid {reader.pid})", \
                done.stderr
    finally:
        for share in shares:
            share.close()
    assert target.read() == bytes([PATTERN]) * target.size


@contextlib.contextmanager
def mounted_from(source: str, where: Path) -> Iterator[None]:
    """A tmpfs whose mount source reads ``source``, as a FUSE image driver's (``fuse2fs
    FILE DIR``) does: the mount table names the file, nothing else ties them."""
    where.mkdir()
    run_tool("mount", "-t", "tmpfs", source, str(where))
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


@pytest.mark.root
def test_a_mount_whose_source_lies_on_a_hung_share_never_hangs_the_look(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """A mount whose source is a file on a FUSE share whose daemon is stopped: the look at
    the mount table stat()ed that source and waited for good, Ctrl-C unheard, so every
    command hung before it wrote or refused anything.  Now a source on a share is not looked
    at, and the flash of another drive goes through."""
    from faulty import FaultyFile

    path, data = image(tmp_path)
    target = loop_factory(4 * MiB, fill=PATTERN)
    share = FaultyFile(MiB, attr_timeout=0)  # every stat asks the daemon
    try:
        with mounted_from(share.file, tmp_path / "m"):
            os.kill(share.pid, signal.SIGSTOP)
            try:
                done = subprocess.run(
                    [*popsicle_cmd(), "flash", str(path), target.path, "--yes", "--no-probe"],
                    capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
                    check=False)
            finally:
                os.kill(share.pid, signal.SIGCONT)
    finally:
        share.close()
    assert done.returncode == 0, done.stderr
    assert target.read(len(data)) == data


@pytest.mark.root
def test_a_loop_target_whose_file_a_share_mounts_is_refused_by_the_file_s_name(
        tmp_path: Path) -> None:
    """The same source not looked at, on a share that answers: a loop device stands on that
    very file, and the mount is seen as holding the loop by the name the kernel gives its
    backing file."""
    from faulty import FaultyFile

    path, _ = image(tmp_path)
    share = FaultyFile(4 * MiB)
    try:
        loop = run_tool("losetup", "-f", "--show", share.file).strip()
        try:
            with mounted_from(share.file, tmp_path / "m"):
                done = popsicle("flash", path, loop, "--yes", "--no-probe")
        finally:
            run_tool("losetup", "-d", loop)
    finally:
        share.close()
    assert done.returncode == 2, done.stderr
    assert refusal(done) == (f"{loop} is backed by {share.file}, which is in use "
                             f"({share.file} is mounted at {tmp_path / 'm'})"), done.stderr
