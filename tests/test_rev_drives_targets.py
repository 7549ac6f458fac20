"""A target is the device the kernel finds under the name given, or it is refused.

Real parts only: loop devices, and a process chrooted into a tmpfs that only its own mount
namespace has (``unshare -m``), whose /dev node of a name we also have stands for another
loop device.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Loop, popsicle_cmd
from loopdev import DROP_OTHER_TESTS_MOUNTS, new_mount_namespace

MiB = 1 << 20
PATTERN = 0xA5

#: In its own mount namespace: a tmpfs over ROOT holding dev/target, a node of MAJOR:MINOR;
#: the process opens it, chroots there, says its pid and sleeps.
_CONTAINED = """
import os, sys, time
root, major, minor = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.system(f"mount --make-rprivate / && {sys.argv[4]} mount -t tmpfs contained {root}")
os.mkdir(f"{root}/dev")
os.mknod(f"{root}/dev/target", 0o600 | 0o060000, os.makedev(major, minor))
fd = os.open(f"{root}/dev/target", os.O_RDONLY)
os.chroot(root)
print(os.getpid(), fd, flush=True)
time.sleep(60)
"""


def popsicle(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*popsicle_cmd(), *map(str, args)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, check=False)


@contextlib.contextmanager
def contained(root: Path, loop: Loop) -> Iterator[tuple[int, int]]:
    """A process whose root is a tmpfs over ``root`` in a mount namespace of its own, with
    ``dev/target`` there standing for ``loop`` (and open): (its pid, the descriptor)."""
    major, minor = loop.major_minor
    proc = subprocess.Popen([*new_mount_namespace(), sys.executable, "-c", _CONTAINED, str(root),
                             str(major), str(minor), DROP_OTHER_TESTS_MOUNTS],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        pid, fd = proc.stdout.readline().split()
        yield int(pid), int(fd)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.root
@pytest.mark.parametrize("command", ["flash", "verify", "erase", "read"])
@pytest.mark.parametrize("through", ["root", "fd"])
def test_a_link_into_another_namespace_never_writes_our_node_of_that_name(
        loop_factory: Callable[..., Loop], tmp_path: Path, command: str, through: str) -> None:
    """/proc/PID/root/dev/target (or /proc/PID/fd/N) leads the kernel to the loop device the
    contained process sees; realpath() gives the text ROOT/dev/target, which in our
    namespace is a node of another loop device.  Before: that other device was checked,
    confirmed and written ("ok", exit 0).  Now refused, naming the kernel's device, and
    neither is touched."""
    named = loop_factory(4 * MiB, fill=PATTERN)
    ours = loop_factory(4 * MiB, fill=PATTERN)
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    os.mknod(root / "dev" / "target", 0o600 | 0o060000, ours.devnum)
    with contained(root, named) as (pid, fd):
        name = f"/proc/{pid}/root/dev/target" if through == "root" else f"/proc/{pid}/fd/{fd}"
        assert os.stat(name).st_rdev == named.devnum  # what the kernel finds there
        args = {"flash": ("flash", "--yes", "--no-probe", image, name),
                "verify": ("verify", image, name),
                "erase": ("erase", "--yes", name),
                "read": ("read", name, tmp_path / "out.img")}[command]
        done = popsicle(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == (
        f"popsicle-py: {name} is not what its resolved name {root}/dev/target is (a link "
        "into another root or mount namespace?); name the drive by its own name, such as "
        f"{named.path}")
    assert named.read() == ours.read() == bytes([PATTERN]) * 4 * MiB
    assert not (tmp_path / "out.img").exists()


@pytest.mark.root
def test_a_link_to_the_same_device_is_still_a_target(loop_factory: Callable[..., Loop],
                                                     tmp_path: Path) -> None:
    """A symlink, and a node made elsewhere with the same numbers, are the device they name:
    written as before."""
    target = loop_factory(4 * MiB, fill=PATTERN)
    image = tmp_path / "disk.img"
    data = os.urandom(MiB)
    image.write_bytes(data)
    link = tmp_path / "link"
    link.symlink_to(target.path)
    done = popsicle("flash", "--yes", "--no-probe", image, link)
    assert done.returncode == 0, done.stderr
    assert target.read(MiB) == data


@pytest.mark.root
@pytest.mark.parametrize("command", ["flash", "read"])
def test_a_node_on_a_nodev_mount_is_refused_as_such(loop_factory: Callable[..., Loop],
                                                    tmp_path: Path, command: str) -> None:
    """A node made on a file system mounted nodev: the kernel refuses to open it, root too.
    Before: refused only at the open, "permission denied; run as root (or with sudo)", to
    root."""
    target = loop_factory(4 * MiB, fill=PATTERN)
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    where = tmp_path / "nodev"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nodev", "nodev", str(where)], check=True)
    try:
        node = where / "stick"
        os.mknod(node, 0o600 | 0o060000, target.devnum)
        args = {"flash": ("flash", "--yes", "--no-probe", image, node),
                "read": ("read", node, tmp_path / "out.img")}[command]
        done = popsicle(*args)
    finally:
        subprocess.run(["umount", str(where)], check=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"popsicle-py: {node} is on a file system mounted nodev, where no device can be "
        f"opened; name it as {target.path}")
    assert target.read() == bytes([PATTERN]) * 4 * MiB


@pytest.mark.root
def test_a_mount_in_a_namespace_kept_by_a_file_is_named(loop_factory: Callable[..., Loop],
                                                        tmp_path: Path) -> None:
    """``unshare --mount=FILE mount DRIVE /mnt``: a mount namespace no process is in, kept
    by a bind mount of its nsfs file, holds the drive.  Before: refused as "in use by the
    kernel ... (a file system on it unmounted with `umount -l` while in use?)"."""
    target = loop_factory(16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", target.path], check=True)
    image = tmp_path / "disk.img"
    data = os.urandom(MiB)
    image.write_bytes(data)
    keep = tmp_path / "ns"
    keep.mkdir()
    subprocess.run(["mount", "--bind", str(keep), str(keep)], check=True)
    try:
        subprocess.run(["mount", "--make-private", str(keep)], check=True)
        (keep / "mnt").touch()
        # The new namespace starts as a copy of this one: another worker's mounts under its
        # tmp_path (a test's "fs") are dropped there, or that test finds its drive mounted in
        # this kept namespace (seen in CI: the swap test below, "is mounted at .../fs in the
        # mount namespace kept by ...").
        drop_pytest_mounts = (
            "for m in $(awk '$5 ~ \"/pytest-of-\" {print $5}' /proc/self/mountinfo | sort -r);"
            ' do umount -l "$m" 2>/dev/null || true; done; ')
        subprocess.run(["unshare", f"--mount={keep}/mnt", "--propagation", "private", "sh",
                        "-c", DROP_OTHER_TESTS_MOUNTS + drop_pytest_mounts
                        + f"mount {target.path} /mnt"], check=True)
        try:
            done = popsicle("flash", "--yes", "--no-probe", image, target.path)
        finally:
            subprocess.run(["umount", str(keep / "mnt")], check=True)
    finally:
        subprocess.run(["umount", str(keep)], check=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"popsicle-py: {target.path} is mounted at /mnt in the mount namespace kept by "
        f"{keep}/mnt, which no process is in: unmount it there, or let that namespace go "
        f"(umount {keep}/mnt)")
    assert target.read(MiB) != data  # the file system's own writes aside, nothing written


@pytest.mark.root
def test_a_swap_file_whose_mount_is_gone_is_named(loop_factory: Callable[..., Loop],
                                                  tmp_path: Path) -> None:
    """Swap on a file of the drive's file system, then ``umount -l``: /proc/swaps names a
    path that is no longer there.  Before: only "a file system on it unmounted with `umount
    -l` while in use?", not the swap that holds it."""
    target = loop_factory(16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", target.path], check=True)
    image = tmp_path / "disk.img"
    data = os.urandom(MiB)
    image.write_bytes(data)
    where = tmp_path / "fs"
    where.mkdir()
    subprocess.run(["mount", target.path, str(where)], check=True)
    swapped = False
    try:
        swap = where / "swapfile"
        with open(swap, "wb") as f:
            f.write(bytes(4 * MiB))
        swap.chmod(0o600)
        subprocess.run(["mkswap", "-q", str(swap)], check=True)
        subprocess.run(["swapon", str(swap)], check=True)
        swapped = True
        subprocess.run(["umount", "-l", str(where)], check=True)
        done = popsicle("flash", "--yes", "--no-probe", image, target.path)
    finally:
        if swapped:
            subprocess.run(["mount", target.path, str(where)], capture_output=True, check=False)
            subprocess.run(["swapoff", str(where / "swapfile")], check=True)
        subprocess.run(["umount", str(where)], capture_output=True, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"popsicle-py: {target.path} is in use by the kernel, though no mount table lists it "
        "and no program has it open (active swap on /swapfile, a file not found here, or a "
        "file system on it unmounted with `umount -l` while in use?)")
    assert target.read(MiB) != data
