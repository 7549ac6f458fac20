"""A drive read as a whole (a master to clone, a drive to image): its bytes must hold still.

A drive is read once; if something writes to it meanwhile, what was read is a mix of before and
after, and every copy of it is wrong.  So a drive to be read is refused while it is mounted
read-write, stacked under device-mapper, active as swap, under a read-write loop device or
open for writing by a process (:func:`refusals`), and its kernel write counters (and, for a
loop device, its backing file) are compared before and after the read (:class:`Stillness`):
a drive written in between fails the run.

The decisions (:func:`rw_mountpoints`, :func:`writer_lines`, :func:`loops_writing`,
:func:`change`) are plain functions over plain data; the rest reads /proc and sysfs.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable, Sequence

from popsicle_py import sysfs
from popsicle_py.drives.holders import openers
from popsicle_py.identity import LoopKey
from popsicle_py.records import record

# --------------------------------------------------------------------------------------------
# Mounts and writers (pure)


@record
class MountLine:
    """One line of /proc/self/mountinfo: the device mounted, where, and whether writable."""

    devnum: int
    mountpoint: str
    read_write: bool


def _unescape(text: str) -> str:
    return (text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def parse_mountinfo(text: str) -> list[MountLine]:
    """The mounts of a mountinfo text; writable when both the mount and its super block are."""
    found: list[MountLine] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 3:
            continue
        major, _, minor = fields[2].partition(":")
        if not (major.isdigit() and minor.isdigit()):
            continue
        writable = "rw" in fields[5].split(",") and "rw" in tail[2].split(",")
        found.append(MountLine(os.makedev(int(major), int(minor)), _unescape(fields[4]),
                               writable))
    return found


def rw_mountpoints(devnums: Iterable[int], mounts: Iterable[MountLine], *,
                   read_only_too: bool = False) -> tuple[str, ...]:
    """Where any of ``devnums`` (a drive and its partitions) is mounted read-write (or at
    all, ``read_only_too``)."""
    wanted = set(devnums)
    seen: dict[str, None] = {}
    for m in mounts:
        if m.devnum in wanted and (m.read_write or read_only_too):
            seen.setdefault(m.mountpoint, None)
    return tuple(seen)


@record
class Writer:
    """A process holding one of the drive's nodes open for writing."""

    pid: int
    name: str


def writer_lines(path: str, writers: Sequence[Writer]) -> list[str]:
    """One refusal line for the processes that could write ``path`` while it is read."""
    if not writers:
        return []
    who = ", ".join(f"{w.name} (pid {w.pid})" for w in writers)
    return [f"{path} is open for writing by {who}: its bytes could change while it is read;"
            " close it first"]


@record
class LoopOn:
    """A loop device and what the kernel says it stands on."""

    device: str
    devnum: int
    key: LoopKey
    read_only: bool


def loops_writing(devnum: int, numbers: frozenset[int], loops: Sequence[LoopOn]
                  ) -> tuple[str, ...]:
    """The read-write loop devices through which the drive ``devnum`` (``numbers``: it and
    its partitions) can be written: over it or a partition of it, at any offset, or, when
    it is a loop device itself, over what it stands on (the same file or device)."""
    own = next((loop.key for loop in loops if loop.devnum == devnum), None)
    found: list[str] = []
    for loop in loops:
        if loop.devnum in numbers or loop.read_only:
            continue
        over_it = loop.key.rdev in numbers
        same_store = own is not None and (
            loop.key.rdev == own.rdev if own.rdev
            else not loop.key.rdev and (loop.key.dev, loop.key.ino) == (own.dev, own.ino))
        if over_it or same_store:
            found.append(loop.device)
    return tuple(found)


def loop_lines(path: str, devices: Sequence[str]) -> list[str]:
    """One refusal line for the read-write loop devices over the drive being read."""
    if not devices:
        return []
    return [f"{path} can be written through {', '.join(devices)} (a loop device over it or "
            "over what it is stored on, attached read-write): its bytes could change while it "
            "is read; detach it, or attach it read-only (losetup -r)"]


# --------------------------------------------------------------------------------------------
# Reading the system (I/O)


def family(devnum: int) -> frozenset[int]:
    """The disk ``devnum`` and its partitions (each has a ``dev`` in the disk's directory)."""
    found = {devnum}
    base = sysfs.block_dir(devnum)
    try:
        names = os.listdir(base)
    except OSError:
        return frozenset(found)
    for name in names:
        number = sysfs.read(os.path.join(base, name, "dev"))
        if number and os.path.exists(os.path.join(base, name, "partition")):
            major, _, minor = number.partition(":")
            found.add(os.makedev(int(major), int(minor)))
    return frozenset(found)


def holders(devnums: Iterable[int]) -> tuple[str, ...]:
    """Device-mapper or RAID devices stacked on the drive or its partitions, named as flash
    names them (a mapping by its /dev/mapper link, else /dev/NAME, and what it is)."""
    from popsicle_py.drives.system import holder_named

    seen: dict[str, None] = {}
    for number in devnums:
        try:
            names = sorted(os.listdir(os.path.join(sysfs.block_dir(number), "holders")))
        except OSError:
            continue
        for name in names:
            seen.setdefault(holder_named(name), None)
    return tuple(seen)


def loops() -> list[LoopOn]:
    """Every loop device that told the kernel's answer in time (one whose backing file is on
    a hung mount is left out: listing never hangs)."""
    from popsicle_py.drives.system import ask_loops

    found: list[LoopOn] = []
    for number, key in ask_loops().keys.items():
        if key is not None:
            name = os.path.basename(os.path.realpath(sysfs.block_dir(number)))
            found.append(LoopOn(f"/dev/{name}", number, key, sysfs.attr(number, "ro") == "1"))
    return found


def swap_partitions(devnums: Iterable[int]) -> tuple[str, ...]:
    """The swap areas that rest on any of ``devnums`` (the kernel writes them at will): the
    drives layer's reading of /proc/swaps, whose stat() of a swap file on a hung share is
    given up in time."""
    from popsicle_py.drives.system import current_swaps

    wanted = frozenset(devnums)
    return tuple(swap.path for swap in current_swaps() if swap.devnums & wanted)


def writers(devnums: Iterable[int]) -> list[Writer]:
    """Processes (other than this one) with one of ``devnums`` open for writing: the drive
    layer's scan of open descriptors (:func:`popsicle_py.drives.openers`, which never stat()s
    a file that is not a device and lets a moment's opener go)."""
    wanted = frozenset(devnums)
    found: dict[int, Writer] = {}
    for opener in openers(wanted):
        if opener.writing and opener.devnum in wanted:
            found.setdefault(opener.process.pid, Writer(opener.process.pid,
                                                        opener.process.program))
    return list(found.values())


def mount_tables() -> list[tuple[int | None, str]]:
    """Our mountinfo (pid None), then one of every other mount namespace's (a container's,
    a service's with PrivateMounts) with a process in it: a drive mounted read-write there
    is written as much as one mounted here."""
    from popsicle_py.drives.opened import pids

    with open("/proc/self/mountinfo") as f:
        ours = f.read()
    tables: list[tuple[int | None, str]] = [(None, ours)]
    seen_ns: set[str] = set()
    seen_text = {ours}
    with contextlib.suppress(OSError):
        seen_ns.add(os.readlink("/proc/self/ns/mnt"))
    for pid in pids():
        try:
            namespace: str | None = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            namespace = None  # another user's, without root: told apart by its table
        if namespace in seen_ns:
            continue
        try:
            with open(f"/proc/{pid}/mountinfo") as f:
                text = f.read()
        except OSError:
            continue  # gone meanwhile
        if namespace is not None:
            seen_ns.add(namespace)
        if text not in seen_text:
            seen_text.add(text)
            tables.append((pid, text))
    return tables


def refusals(path: str, *, cached: bool = False) -> list[str]:
    """Why the drive at ``path`` cannot be read as a whole now, one line each (empty: it can).

    Mounted read-only is fine (so is a read-only loop device over it); mounted read-write,
    stacked under another device, active as swap, under a read-write loop device or open for
    writing by a process is not: any of them may write to it, changing its bytes mid-read.
    ``cached``: the drive is read through the page cache (a master cloned by ``flash`` or
    ``watch``), where a file system mounted even read-only shows blocks it changed in memory
    only (ext4 its journal's superblock): the copies would differ from the drive.
    """
    try:
        devnum = os.stat(path).st_rdev
    except OSError as exc:
        return [f"{path} cannot be read: {exc.strerror or exc}"]
    numbers = family(devnum)
    lines: list[str] = []
    said: set[str] = set()  # a service's copy of our own mount is not said again
    seen_mounted = False
    for pid, text in mount_tables():
        table = parse_mountinfo(text)
        seen_mounted = seen_mounted or any(m.devnum in numbers for m in table)
        mounted = [m for m in rw_mountpoints(numbers, table) if m not in said]
        said.update(mounted)
        where = "" if pid is None else f" in the mount namespace of pid {pid} (a container?)"
        if mounted:
            lines.append(f"{path} is mounted read-write at {', '.join(mounted)}{where}: its "
                         "bytes could change while it is read; unmount it"
                         + ("" if cached else " or remount it read-only"))
        if cached:
            quiet = [m for m in rw_mountpoints(numbers, table, read_only_too=True)
                     if m not in said]
            said.update(quiet)
            if quiet:
                lines.append(f"{path} is mounted read-only at {', '.join(quiet)}{where}: a "
                             "mounted file system's blocks in memory can differ from the "
                             "drive's (ext4 changes its journal's even read-only), and the "
                             "copies would hold those; unmount it first")
    stacked = holders(numbers)
    if stacked:
        lines.append(f"{path} is in use by {', '.join(stacked)}: its bytes could change "
                     "while it is read; deactivate that first")
    swaps = swap_partitions(numbers)
    if swaps:
        lines.append(f"{path} is in use as swap ({', '.join(swaps)}): its bytes could change "
                     "while it is read; swapoff first")
    lines.extend(loop_lines(path, loops_writing(devnum, numbers, loops())))
    lines.extend(writer_lines(path, writers(numbers)))
    if not lines and not seen_mounted and kernel_holds(path):
        lines.append(f"{path} is held exclusively (by the kernel or a program), though no "
                     "process's mount table shows it mounted (a mount namespace no process is "
                     "in?): its bytes could change while it is read")
    return lines


def kernel_holds(path: str) -> bool:
    """Whether the kernel refuses an exclusive open of ``path``: something holds it that no
    table shows (a mount in a mount namespace kept by a bind mount alone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        return exc.errno == errno.EBUSY
    os.close(fd)
    return False


# --------------------------------------------------------------------------------------------
# Did it hold still?


@record
class Counters:
    """What changes when a drive is written: the kernel's counters of sectors written and
    discarded, and, for a loop device, its backing file's size and mtime."""

    writes: tuple[int, ...]
    backing: tuple[int, int] | None = None


def change(before: Counters, after: Counters) -> str | None:
    """What shows that the drive was written between two readings, or None."""
    if before.writes != after.writes:
        return "it was written to"
    if before.backing != after.backing:
        return "its backing file was written to"
    return None


def counters(path: str) -> Counters:
    """The drive's sectors written and discarded now (``/sys/dev/block/M:m/stat`` fields 7
    and 14; not the request counts, which an empty cache flush, as from ``blkid``, raises)."""
    devnum = os.stat(path).st_rdev
    fields = (sysfs.attr(devnum, "stat") or "").split()
    writes = tuple(int(fields[i]) for i in (6, 13) if i < len(fields))
    backing = None
    name = sysfs.attr(devnum, "loop/backing_file")
    if name:
        try:
            st = os.stat(name)
            backing = (st.st_size, st.st_mtime_ns)
        except OSError:
            backing = (-1, -1)
    return Counters(writes, backing)


def _write_back(path: str) -> None:
    """Write back the drive's dirty cached pages now, so that the counters count them: before
    the read (a read-only mount's last pages: no change), and after it (a write made
    meanwhile through the page cache: a change)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DriveChanged(OSError):
    """The drive read as a whole was written while it was read: no copy of it is true."""

    def __init__(self, path: str, how: str) -> None:
        super().__init__(errno.EIO, f"the master drive {path} changed while it was read "
                         f"({how}): no copy of it can be trusted")
        self.how = how


def nodes(path: str) -> list[str]:
    """``path`` and the /dev node of each of its partitions (each has a page cache of its
    own: a buffered write through /dev/sdb1 is not written back by a sync of /dev/sdb)."""
    found = [path]
    try:
        devnum = os.stat(path).st_rdev
    except OSError:
        return found
    for number in sorted(family(devnum) - {devnum}):
        node = "/dev/" + os.path.basename(os.path.realpath(sysfs.block_dir(number)))
        try:
            if os.stat(node).st_rdev == number:  # devtmpfs: never hangs
                found.append(node)
        except OSError:
            continue
    return found


class Stillness:
    """Takes the drive's counters when made; :meth:`check` raises :class:`DriveChanged` if
    they moved since (the engine calls it once the source is read, before any drive gets its
    head)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.nodes = nodes(path)
        for node in self.nodes:  # a read-only mount's last dirty pages, before counting
            _write_back(node)
        self.before = counters(path)

    def check(self) -> None:
        # A buffered write (dd without oflag=direct) sits in the page cache, uncounted, until
        # written back: write it back first, or a drive written mid-read would pass as still;
        # through a partition's node too, whose pages a sync of the disk leaves alone (the
        # writer may hold it open: its last close would have written them back).
        for node in self.nodes:
            _write_back(node)
        how = change(self.before, counters(self.path))
        if how is not None:
            raise DriveChanged(self.path, how)
