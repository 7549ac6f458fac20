"""What a loop device stands on comes from the kernel, not from the name sysfs shows.

sysfs's ``loop/backing_file`` is a path as the process that attached the loop device saw it:
in a container that path means nothing here, and a deleted file has no path at all.  Each
case below wrote a drive that should have been refused while the rules followed that name
(the image being written, a file a mounted loop device uses, a window over the target made
through a device node of another name); each is refused now, with one line, exit 2, nothing
written.  And holders that come after the confirmation are judged by the same rules.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Loop, popsicle_cmd
from faulty import FaultyDrive
from loopdev import DROP_OTHER_TESTS_MOUNTS, new_mount_namespace
from loopdev import run as run_tool

MiB = 1 << 20
PATTERN = 0x3C


def popsicle(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, check=False)


def sysfs_backing(path: str) -> str | None:
    try:
        return (Path("/sys/block") / os.path.basename(path) / "loop" / "backing_file"
                ).read_text().rstrip("\n")
    except OSError:
        return None


LOOP_CTL_ADD = 0x4C80


def _add_loop_device(number: int) -> None:
    """Have the kernel make /dev/loop``number`` (LOOP_CTL_ADD); nothing if it cannot."""
    with contextlib.suppress(OSError):
        fd = os.open("/dev/loop-control", os.O_RDWR)
        try:
            fcntl.ioctl(fd, LOOP_CTL_ADD, number)
        finally:
            os.close(fd)


class Attached:
    """Loop devices this test attached, each detached at the end only while sysfs still
    names the backing it had (the kernel may have given the number to another test)."""

    def __init__(self) -> None:
        self.loops: dict[str, Path] = {}

    def add(self, path: str, backing: Path) -> str:
        self.loops[path] = backing
        return path

    def here(self, backing: Path, *args: str) -> str:
        return self.add(run_tool("losetup", "-f", "--show", *args, str(backing)).strip(),
                        backing)

    def in_container(self, backing: Path, *args: str, device: tuple[int, int] | None = None
                     ) -> str:
        """Attached in a private mount namespace, under a name only that namespace has: a
        bind mount of the file's directory, or (``device``) a node made on its own tmpfs
        under a name no kernel device has ("xvda")."""
        inside = Path(tempfile.mkdtemp(prefix="popsicle-mnt-ns-"))
        if device is None:
            setup = f"mount --bind {backing.parent} {inside} && "
            name = inside / backing.name  # shown as "/disk.img" once the namespace is gone
        else:
            setup = (f"mount -t tmpfs none {inside} && "
                     f"mknod {inside}/xvda b {device[0]} {device[1]} && ")
            name = inside / "xvda"
        done = subprocess.run(
            [*new_mount_namespace(), "sh", "-c",
             DROP_OTHER_TESTS_MOUNTS + setup + f"losetup -f --show {' '.join(args)} {name}"],
            capture_output=True, text=True, check=True, timeout=60)
        os.rmdir(inside)
        path = done.stdout.strip()
        shown = sysfs_backing(path)  # the path in a namespace now gone: "/disk.img"
        assert shown is not None and shown != str(backing) and not os.path.exists(shown)
        return self.add(path, backing)

    def after(self, name: str, backing: Path) -> str:
        """Attached as a loop device whose name sorts after ``name`` ("loop3" -> "loop4",
        "loop30"): asked after it, were the loop devices asked in turn."""
        for number in range(1024):
            path = f"/dev/loop{number}"
            if f"loop{number}" <= name or sysfs_backing(path) is not None:
                continue
            if not os.path.exists(path):  # made when asked for: "loop9" has only "loop90" on
                _add_loop_device(number)
                if not os.path.exists(path):
                    continue
            if subprocess.run(["losetup", path, str(backing)], capture_output=True,
                              check=False).returncode == 0:
                return self.add(path, backing)
        raise AssertionError(f"no free loop device named after {name}")

    def detach(self) -> None:
        for path in self.loops:
            subprocess.run(["umount", "-l", path], capture_output=True, check=False)
            if sysfs_backing(path) is not None:
                subprocess.run(["losetup", "-d", path], capture_output=True, check=False)


@pytest.fixture
def attached() -> Iterator[Attached]:
    made = Attached()
    try:
        yield made
    finally:
        made.detach()


@contextlib.contextmanager
def mounted(device: str, *options: str) -> Iterator[str]:
    mountpoint = tempfile.mkdtemp(prefix="popsicle-mnt-")
    try:
        run_tool("mount", *options, device, mountpoint)
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)
        os.rmdir(mountpoint)


def ext4_file(tmp_path: Path, size: int = 8 * MiB) -> Path:
    path = tmp_path / "fs.img"
    with open(path, "wb") as f:
        f.truncate(size)
    run_tool("mkfs.ext4", "-q", "-F", str(path))
    return path


def refused(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0].removeprefix("popsicle-py: ")


@pytest.mark.root
def test_the_image_attached_in_a_container_is_the_image(
        tmp_path: Path, attached: Attached) -> None:
    image = tmp_path / "disk.img"
    data = os.urandom(4 * MiB)
    image.write_bytes(data)
    loop = attached.in_container(image)
    assert refused(popsicle("flash", image, loop, "--yes")) == \
        f"{loop} holds the image being written"
    assert image.read_bytes() == data


@pytest.mark.root
def test_a_loop_device_over_a_deleted_file_that_a_mounted_one_uses_is_refused(
        tmp_path: Path, attached: Attached) -> None:
    fs = ext4_file(tmp_path)
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    first, second = attached.here(fs), attached.here(fs)
    with mounted(first, "-o", "ro") as mountpoint:
        before = Path(fs).read_bytes()
        fs.unlink()  # both now stand on "fs.img (deleted)": no name to find it by
        line = refused(popsicle("flash", image, second, "--yes"))
        assert line == (f"{second} is backed by {fs} (deleted), which is in use ({first} is "
                        f"mounted at {mountpoint})"), line
        with open(second, "rb") as f:
            assert f.read(len(before)) == before


@pytest.mark.root
def test_a_window_made_in_a_container_through_a_node_of_another_name_is_seen(
        tmp_path: Path, loop_factory: Callable[..., Loop], attached: Attached) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    target = loop_factory(8 * MiB, fill=PATTERN)
    window = attached.in_container(target.backing, "-o", str(MiB), "--sizelimit",
                                   str(2 * MiB), device=target.major_minor)
    for command in (["flash", image, target.path, "--yes"], ["erase", target.path, "--yes"]):
        assert refused(popsicle(*command)) == (
            f"{target.path} is in use by {window}, a loop device over it at offset {MiB}")
    assert target.read() == bytes([PATTERN]) * target.size


@pytest.mark.root
def test_a_program_holding_another_loop_device_over_the_same_file_holds_the_target(
        tmp_path: Path, attached: Attached) -> None:
    backing = tmp_path / "vm.img"
    backing.write_bytes(bytes([PATTERN]) * 4 * MiB)
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    first, second = attached.here(backing), attached.here(backing)
    fd = os.open(first, os.O_RDWR | os.O_CLOEXEC)
    try:
        holder = subprocess.Popen(["sleep", "60"], stdin=fd)
    finally:
        os.close(fd)
    try:
        assert refused(popsicle("flash", image, second, "--yes")) == \
            f"{second} is open in sleep (pid {holder.pid}) through {first}"
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert backing.read_bytes() == bytes([PATTERN]) * 4 * MiB


@pytest.mark.root
@pytest.mark.parametrize("holder", ["mount", "swap"])
def test_a_loop_device_over_the_same_file_put_to_use_after_the_confirmation_is_refused(
        tmp_path: Path, attached: Attached, holder: str) -> None:
    """Between the plan (and the user's "yes") and the first write, a second loop device
    over the target's file is mounted or made swap: refused just before the first write."""
    from popsicle_py import app
    from popsicle_py.errors import Refused
    from popsicle_py.signals import Cancellation
    from popsicle_py.view import PlainView

    if holder == "mount":
        backing = ext4_file(tmp_path)
    else:
        backing = tmp_path / "swap.img"
        with open(backing, "wb") as f:
            f.truncate(8 * MiB)
        run_tool("mkswap", "-q", str(backing))
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    target = attached.here(backing)
    before = backing.read_bytes()
    request = app.FlashRequest(app.SourceOptions(str(image)),
                               app.TargetOptions(devices=(target,)))
    job = app.prepare_flash(request)  # nothing uses the file yet: the plan passes
    sibling = attached.here(backing)
    with contextlib.ExitStack() as stack:
        if holder == "mount":
            mountpoint = stack.enter_context(mounted(sibling, "-o", "ro"))
            expected = (f"{target} is backed by {backing}, which is in use ({sibling} is "
                        f"mounted at {mountpoint})")
        else:
            run_tool("swapon", sibling)
            stack.callback(subprocess.run, ["swapoff", sibling], check=False)
            expected = f"{target} is in use as swap ({sibling})"
        with job, pytest.raises(Refused) as refusal:
            job.run(PlainView(), Cancellation())
        # Another test's losetup may have the sibling open that instant ("; open in losetup
        # (pid N) through /dev/loopN" follows, as true as the rest).
        [line] = refusal.value.lines
        assert line == expected or line.startswith(f"{expected}; open in "), line
    after = backing.read_bytes()
    if holder == "mount":
        assert after == before
        return
    # An active swap area is the kernel's to write (it swapped a test's page of 0x5A out to
    # the first slot, offset 4096, in CI): its header is intact and no page holds the image's.
    data = image.read_bytes()
    assert after[:4096] == before[:4096]
    assert not [o for o in range(0, len(data), 4096) if after[o : o + 4096] == data[o : o + 4096]]


@pytest.mark.root
def test_a_file_that_does_not_answer_never_hangs_a_flash(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    """A file on a hung FUSE (or network) mount never answers a stat.  The kernel stats a
    loop device's backing file to say what it stands on, and a process's open file is
    stat()ed to see whether it is a disk: a loop device over such a file, a program holding
    that file open and one holding the loop device open hold up nothing; another drive's
    flash still runs, and the loop device itself is refused (the old code hung on each: the
    file is under /dev/shm, which looked like a device's path)."""
    image = tmp_path / "disk.img"
    data = os.urandom(MiB)
    image.write_bytes(data)
    target = loop_factory(4 * MiB)
    hung = FaultyDrive(4 * MiB, attr_timeout=0)
    loop, file = hung.path, hung.file
    readers = []
    for path in (file, loop):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            readers.append(subprocess.Popen(["sleep", "60"], stdin=fd))
        finally:
            os.close(fd)
    try:
        os.kill(hung.pid, signal.SIGSTOP)  # every request to it waits from now on
        try:
            done = popsicle("flash", image, target.path, "--yes")
            itself = popsicle("flash", image, loop, "--yes")
        finally:
            os.kill(hung.pid, signal.SIGCONT)
    finally:
        for reader in readers:
            reader.kill()
            reader.wait(timeout=10)
        hung.close()
    assert done.returncode == 0, done.stderr
    assert target.read(len(data)) == data
    assert itself.returncode == 2, itself.stderr
    assert (f"popsicle-py: {loop} is backed by {file}, which does not answer (a file "
            "on a hung network or FUSE mount?)\n") in itself.stderr, itself.stderr


@pytest.mark.root
def test_a_loop_device_that_does_not_answer_hides_none_asked_after_it(
        tmp_path: Path, attached: Attached) -> None:
    """Loop devices are asked in turn: one whose file hangs is given up on, and those after
    it are still asked.  Before, they all went unanswered, and a mounted loop device over the
    target's file, asked after a hung one, protected nothing: the target was written."""
    fs = ext4_file(tmp_path)
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    target = attached.here(fs)
    hung = FaultyDrive(4 * MiB, attr_timeout=0)
    try:
        sibling = attached.after(os.path.basename(hung.path), fs)
        with mounted(sibling, "-o", "ro") as mountpoint:
            before = fs.read_bytes()
            os.kill(hung.pid, signal.SIGSTOP)
            try:
                done = popsicle("flash", image, target, "--yes")
            finally:
                os.kill(hung.pid, signal.SIGCONT)
            assert refused(done) == (f"{target} is backed by {fs}, which is in use ({sibling} "
                                     f"is mounted at {mountpoint})")
            assert fs.read_bytes() == before
    finally:
        hung.close()
