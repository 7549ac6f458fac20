"""What other processes have open or mapped that may hold a drive: every block device behind
a descriptor (/proc/PID/fd) or a file mapping (/proc/PID/maps), and the regular files they
write that back a loop device.

A name says nothing: a node made with mknod anywhere (a chroot's or a container's /dev, a
tool's private node) opens the same drive.  So files are stat()ed, through /proc (the
descriptor itself, /proc/PID/map_files/START-END), never by name, and never on the calling
thread: a file on a hung network or FUSE share, perhaps lazily unmounted (no mount table
lists it, no name tells), would never answer.  They are stat()ed in turn on a worker thread
this one watches (:class:`Watched`): a stat that does not answer in :data:`STEP`, on a file
system that is not a local one, is given up on, its file system (/proc/PID/fdinfo's
``mnt_id``, a mapping's device) skipped from then on, here and in every later look while it
stays hung, and a new worker goes on with the next file; one more hung share after
:data:`ASK_FILES` ends the look.  A file that was not stat()ed (its share hangs, or the look
ended first) is judged by its name: one in /dev, or a block device's kernel name, holds that
device, as a look by names alone would have found.  A mapping on a file system mounted
``nodev`` cannot be of a device, and is not looked at unless written with the inode number
of a loop device's backing file.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Iterable

from popsicle_py import sysfs
from popsicle_py.drives.asking import start_quiet
from popsicle_py.drives.model import Inode
from popsicle_py.drives.system import DeviceNames
from popsicle_py.records import record

#: Seconds one stat() may take before its file system is taken for hung.
STEP = 0.5

#: Seconds after which one more hung share ends a look (the files after it not looked at).
ASK_FILES = 2.0

@record
class Held:
    """A block device, or a regular file written, that a process holds."""

    pid: int
    name: str  # as the process names it (its descriptor's link, its mapping's path)
    mode: int  # st_mode: a block device or a regular file
    rdev: int
    inode: Inode
    writing: bool  # opened for writing; a shared writable mapping


#: File systems whose stat() is answered from memory or a local disk: a slow one is not hung.
LOCAL_FILE_SYSTEMS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "bcachefs", "f2fs", "jfs", "reiserfs", "nilfs2",
    "zfs", "vfat", "msdos", "exfat", "ntfs", "ntfs3", "hfs", "hfsplus", "udf", "iso9660",
    "squashfs", "erofs", "tmpfs", "ramfs", "devtmpfs", "devpts", "proc", "sysfs", "mqueue",
    "hugetlbfs", "cgroup", "cgroup2", "bpf", "tracefs", "debugfs", "securityfs", "configfs",
    "pstore", "efivarfs", "binfmt_misc",
})


def _mountinfo(text: str) -> Iterable[tuple[int, int, bool, bool]]:
    """(mount id, device number, nodev, local) of each line of a mountinfo."""
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 6 or not fields[0].isdigit():
            continue
        major, _, minor = fields[2].partition(":")
        if major.isdigit() and minor.isdigit():
            yield (int(fields[0]), os.makedev(int(major), int(minor)),
                   "nodev" in fields[5].split(","),
                   right.partition(" ")[0] in LOCAL_FILE_SYSTEMS)


class Mounts:
    """Every mount namespace's mounts, each read once when one of its processes needs it:
    the device number of a mount id (fdinfo), whether a device number is mounted only
    ``nodev`` (a mapping's), and whether it is a local file system."""

    def __init__(self) -> None:
        self.dev_of_id: dict[int, int] = {}
        self.nodev: dict[int, bool] = {}
        self.local: dict[int, bool] = {}  # by device number
        self.namespaces: set[str] = set()
        self.learn("self")

    def learn(self, pid: int | str) -> str:
        """Read the mount namespace of ``pid`` (once); its name."""
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            namespace = f"?{pid}"
        if namespace not in self.namespaces:
            self.namespaces.add(namespace)
            for mount_id, dev, nodev, local in _mountinfo(
                    sysfs.read(f"/proc/{pid}/mountinfo") or ""):
                self.dev_of_id[mount_id] = dev
                self.nodev[dev] = nodev and self.nodev.get(dev, True)  # one super block
                self.local[dev] = local
        return namespace

    def only_nodev(self, pid: int, dev: int) -> bool:
        if dev not in self.nodev:
            self.learn(pid)
        return self.nodev.get(dev, False)  # in no table: lazily unmounted, whatever it was


def fdinfo(pid: int, fd: str) -> tuple[bool, int | None, int | None] | None:
    """(written, mount id, inode number) of a descriptor, from /proc/PID/fdinfo; None when it
    was closed meanwhile.  Flags unknown: written (assume the worst)."""
    try:
        handle = os.open(f"/proc/{pid}/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(handle, 4096)
    except OSError:
        return None
    finally:
        os.close(handle)
    writing, mount_id, ino = True, None, None
    for line in text.splitlines():
        key, _, value = line.partition(b":")
        try:
            if key == b"flags":
                writing = (int(value.strip(), 8) & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
            elif key == b"mnt_id":
                mount_id = int(value)
            elif key == b"ino":
                ino = int(value)
        except ValueError:
            continue
    return writing, mount_id, ino


def pids() -> list[int]:
    """Every process now, in order."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit())


#: One file to stat: (pid, its link in /proc, its mapping's device number; -1: a descriptor).
_Item = tuple[int, str, int]

#: File systems (mount ids, device numbers) a stat() hung on and has not returned from yet:
#: their files are not stat()ed meanwhile.
_hung_mounts: set[int] = set()
_hung_devs: set[int] = set()
_hung_lock = threading.Lock()


def _fs_of(item: _Item, mounts: Mounts) -> tuple[int | None, int | None]:
    """(mount id, device number) of an item's file system, as far as /proc tells."""
    pid, link, dev = item
    if dev >= 0:
        return None, dev
    info = fdinfo(pid, link.rpartition("/")[2])
    mount_id = info[1] if info is not None else None
    return mount_id, mounts.dev_of_id.get(mount_id) if mount_id is not None else None


def _local(fs: tuple[int | None, int | None], mounts: Mounts) -> bool:
    """Whether a file system is a local one (in a mount table, of a local type): a stat()
    there may be slow (a loaded machine), never hung."""
    return fs[1] is not None and mounts.local.get(fs[1], False)


def _on_hung(item: _Item, mounts: Mounts) -> bool:
    with _hung_lock:
        if not (_hung_mounts or _hung_devs):
            return False
    mount_id, dev = _fs_of(item, mounts)
    with _hung_lock:
        return mount_id in _hung_mounts or dev in _hung_devs


def _release(fs: tuple[int | None, int | None]) -> None:
    mount_id, dev = fs
    with _hung_lock:
        if mount_id is not None:
            _hung_mounts.discard(mount_id)
        if dev is not None:
            _hung_devs.discard(dev)


class Watched:
    """stat() of each item's link, in turn, on a worker thread started now and watched from
    this one when :meth:`results` is asked for (meanwhile, this thread may do other work).

    A stat that does not answer in ``step``, on a file system that is not a local one (a
    network or FUSE share, one in no mount table: lazily unmounted), is given up on, its file
    system marked hung (skipped here and by later looks until that stat() returns), and a
    new worker goes on with the next item; one that hangs after ``deadline`` (monotonic)
    ends the look, the rest not looked at.  A local one is only slow: waited for.  The worker
    takes no lock per file (thousands of them, 2 us each): single assignments, which the
    interpreter makes whole; the lock orders giving up on a file against its return."""

    def __init__(self, items: list[_Item], mounts: Mounts, deadline: float,
                 step: float = STEP) -> None:
        self.items, self.mounts, self.deadline, self.step = items, mounts, deadline, step
        self.answers: dict[int, os.stat_result] = {}
        self.lock = threading.Lock()
        self.finished = threading.Event()
        self.generation = 0
        self.busy = -1  # the item being stat()ed, -1 between two
        self.stuck: dict[int, tuple[int | None, int | None]] = {}
        if items:
            start_quiet(self._work, 0, 0, name="popsicle-stat")
        else:
            self.finished.set()

    def _given_up(self, mine: int, start: int, last: int) -> bool:
        """Whether this worker's generation was given up on; then its files in
        ``start..last`` that were taken for hung are hung no longer."""
        if self.generation == mine:
            return False
        with self.lock:
            for index in [i for i in self.stuck if start <= i <= last]:
                _release(self.stuck.pop(index))
        return True

    def _work(self, mine: int, start: int) -> None:
        items, answers, look = self.items, self.answers, os.stat
        index = start - 1
        for index in range(start, len(items)):
            if self.generation != mine:
                self._given_up(mine, start, index - 1)
                return
            if (_hung_mounts or _hung_devs) and _on_hung(items[index], self.mounts):
                continue
            self.busy = index
            try:
                answers[index] = look(items[index][1])
            except OSError:
                self.busy = -1
                continue
            self.busy = -1
        if not self._given_up(mine, start, index):
            self.finished.set()

    def results(self) -> dict[int, os.stat_result]:
        """{index: stat result} of the items that answered."""
        seen = -1
        while not self.finished.wait(self.step):
            now = self.busy
            if now < 0 or now != seen:
                seen = now  # moving on: look again in a step
                continue
            fs = _fs_of(self.items[now], self.mounts)  # /proc: answers whatever the share
            if fs[0] is not None and fs[1] is None:  # a mount of another namespace
                self.mounts.learn(self.items[now][0])
                fs = (fs[0], self.mounts.dev_of_id.get(fs[0]))
            if _local(fs, self.mounts):
                continue  # slow, not hung: it answers
            with self.lock:
                self.stuck[now] = fs
                with _hung_lock:
                    if fs[0] is not None:
                        _hung_mounts.add(fs[0])
                    if fs[1] is not None:
                        _hung_devs.add(fs[1])
                self.generation += 1
            if time.monotonic() >= self.deadline:
                break  # many hung shares: the rest are not looked at
            seen = -1
            start_quiet(self._work, self.generation, now + 1, name="popsicle-stat")
        with self.lock:
            self.generation += 1  # a worker still going stops at its next item
            return dict(list(self.answers.items()))


class _Scan:
    """One look at every process: the files to stat, and what they turn out to be."""

    def __init__(self, backing_files: frozenset[Inode]) -> None:
        self.names = DeviceNames()
        self.in_dev = self.names.in_dev
        self.mounts = Mounts()
        self.backing_files = backing_files
        self.inos = frozenset(ino for _, ino in backing_files)
        self.found: list[Held] = []
        #: Every descriptor of every process (its device -1), and each file mapped.
        self.items: list[_Item] = []
        #: (item, pid, name, written) of each mapping looked at.
        self.maps: list[tuple[int, int, str, bool]] = []
        self.mapped: dict[tuple[int, int], int] = {}  # a file mapped by many: one item

    def take(self, pid: int, st: os.stat_result, *, link: str = "", name: str = "",
             writing: bool | None = None) -> None:
        """Keep a block device, or a backing file written; a descriptor's name and flags
        are read now (/proc: never a hang), for the few that are."""
        inode = (st.st_dev, st.st_ino)
        device = stat.S_ISBLK(st.st_mode)
        if not (device or (stat.S_ISREG(st.st_mode) and writing is not False
                           and inode in self.backing_files)):
            return
        if link:
            info = fdinfo(pid, link.rpartition("/")[2])
            try:
                name = os.readlink(link)
            except OSError:
                return  # closed meanwhile: holds nothing
            if info is None:
                return
            writing = info[0]
        if device or writing:
            self.found.append(Held(pid, name.removesuffix(" (deleted)"), st.st_mode,
                                   st.st_rdev, inode, bool(writing)))

    def descriptors(self, pid: int) -> bool:
        """Every descriptor of a process, to stat; whether it has any (a kernel thread has
        none).  Not even named first: a stat costs what a readlink does."""
        directory = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(directory)
        except OSError:
            return False
        self.items.extend((pid, f"{directory}/{fd}", -1) for fd in fds)
        return bool(fds)

    def mappings(self, pid: int) -> None:
        """File mappings that may be of a device (shared ones, names in /dev): a program that
        mapped a drive and closed its descriptor still reads and writes it."""
        for line in _candidate_lines(_read_all(f"/proc/{pid}/maps")):
            parts = line.split(None, 5)
            if len(parts) < 6 or len(parts[1]) != 4 or not parts[5].startswith(b"/"):
                continue
            span, perms, _, device, inode, path = parts
            major, _, minor = device.partition(b":")
            start, _, end = span.partition(b"-")
            try:
                dev, ino = os.makedev(int(major, 16), int(minor, 16)), int(inode)
                link = f"/proc/{pid}/map_files/{int(start, 16):x}-{int(end, 16):x}"
            except ValueError:
                continue
            name = os.fsdecode(path)
            writing = perms[1:2] == b"w" and perms[3:4] == b"s"
            if perms[3:4] != b"s" and not self.in_dev(name):
                continue
            if self.mounts.only_nodev(pid, dev) and not (writing and ino in self.inos):
                continue
            if (dev, ino) not in self.mapped:  # each library once, not once per process
                self.mapped[(dev, ino)] = len(self.items)
                self.items.append((pid, link, dev))
            self.maps.append((self.mapped[(dev, ino)], pid, name, writing))

    def run(self, pids: Iterable[int]) -> list[Held]:
        """Every process's descriptors and mappings, what they are."""
        deadline = time.monotonic() + ASK_FILES
        for pid in pids:
            if self.descriptors(pid) or _has_memory(pid):
                self.mappings(pid)
        answered = Watched(self.items, self.mounts, deadline).results()  # one worker for all
        for index, (pid, link, dev) in enumerate(self.items):
            if dev >= 0:
                continue
            if index in answered:
                self.take(pid, answered[index], link=link)
            else:  # on a hung share, or past the look's deadline
                self.by_name(pid, link)
        for index, pid, name, writing in self.maps:
            if index in answered:
                self.take(pid, answered[index], name=name, writing=writing)
            elif (st := self.our_node(name)) is not None:
                self.take(pid, st, name=name, writing=writing)
        return self.found

    def our_node(self, name: str) -> os.stat_result | None:
        """The node a device's name stands for in our /dev (devtmpfs: it answers whatever
        else hangs), for a file that could not be stat()ed itself; None for other names."""
        name = name.removesuffix(" (deleted)")
        base = os.path.basename(name)
        ours = name if self.in_dev(name) else f"/dev/{base}" if base in self.names.names \
            else None
        try:
            return None if ours is None else os.stat(ours)
        except OSError:
            return None

    def by_name(self, pid: int, link: str) -> None:
        """A descriptor whose file did not answer (its share hangs) or was not reached
        before the look's deadline (many hung shares) holds what its name says: a name in
        /dev, or a block device's kernel name, is taken at its word.  Never less than a look
        by names alone would find."""
        try:
            name = os.readlink(link)
        except OSError:
            return
        if (st := self.our_node(name)) is not None:
            self.take(pid, st, link=link)


def _has_memory(pid: int) -> bool:
    """Whether a process without descriptors has memory of its own: a kernel thread (most
    of those) has neither, nor any mapping to read."""
    try:
        os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    return True


def _read_all(path: str) -> bytes:
    """A /proc file's bytes (b"" when gone): a kernel thread's maps are empty."""
    try:
        handle = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    chunks: list[bytes] = []
    try:
        while chunk := os.read(handle, 1 << 16):  # a page at a time: up to an empty read
            chunks.append(chunk)
    except OSError:
        return b""
    finally:
        os.close(handle)
    return b"".join(chunks)


def _candidate_lines(data: bytes) -> Iterable[bytes]:
    """Lines of a maps file that may map a device: shared mappings, and names in /dev
    (found with find(): most processes have a few among hundreds of libraries' lines)."""
    starts: set[int] = set()
    for needle in (b"s ", b" /dev/"):  # "r--s ", "rw-s ", "rwxs "; a few paths
        at = data.find(needle)
        while at >= 0:
            start = data.rfind(b"\n", 0, at) + 1
            end = data.find(b"\n", at)
            end = len(data) if end < 0 else end
            if start not in starts:
                starts.add(start)
                yield data[start:end]
            at = data.find(needle, end)


def held(backing_files: frozenset[Inode] = frozenset()) -> list[Held]:
    """Every block device other processes hold (a descriptor, a mapping), and every file in
    ``backing_files`` (loop devices' backing files) they write."""
    ours = os.getpid()
    return _Scan(backing_files).run(pid for pid in pids() if pid != ours)


#: Seconds the test of an exclusive open is given (a dying drive may not answer at once).
TRY_OPEN = 2.0


class ExclusiveOpens:
    """A test of an exclusive open (read-only, O_EXCL, closed at once) of each drive, from
    now on, on a thread of their own; :meth:`refused` says which the kernel refused (EBUSY).
    A file system unmounted with ``umount -l`` while in use is in no mount table and no
    process has its drive open, yet it holds it: writing would fail at the exclusive open,
    after the confirmation.  One thread for all (a thread each cost 0.2 ms, the opens 25 us):
    a drive that does not answer in :data:`TRY_OPEN` counts as not refused, and so do those
    after it (the writers' own exclusive opens still find what holds them)."""

    def __init__(self, devnums: Iterable[int], timeout: float = TRY_OPEN) -> None:
        self.deadline = time.monotonic() + timeout
        self.tried = tuple(dict.fromkeys(devnums))
        self.answers: dict[int, bool] = {}
        self.lock = threading.Lock()
        self.all_done = threading.Event()
        if self.tried:
            start_quiet(self._try_all, name="popsicle-try-open")
        else:
            self.all_done.set()

    def _try_all(self) -> None:
        for devnum in self.tried:
            refused = exclusive_open_refused(devnum)
            with self.lock:
                self.answers[devnum] = refused
        self.all_done.set()

    def refused(self) -> dict[int, bool]:
        self.all_done.wait(max(0.0, self.deadline - time.monotonic()))
        with self.lock:
            return {devnum: self.answers.get(devnum, False) for devnum in self.tried}


def exclusive_open_refused(devnum: int) -> bool:
    """Whether the kernel refuses an exclusive open of the block device ``devnum`` (its
    node in /dev) as busy."""
    name = f"/dev/{os.path.basename(os.path.realpath(sysfs.block_dir(devnum)))}"
    try:
        st = os.stat(name)
        if not stat.S_ISBLK(st.st_mode) or st.st_rdev != devnum:
            return False
        os.close(os.open(name, os.O_RDONLY | os.O_EXCL | os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError as e:
        return e.errno == errno.EBUSY
    return False
