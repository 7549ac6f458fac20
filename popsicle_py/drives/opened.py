"""What other processes have open or mapped that may hold a drive: every block device behind
a descriptor (/proc/PID/fd) or a file mapping (/proc/PID/maps), and the regular files they
write that back a loop device.

A name says nothing: a node made with mknod anywhere (a chroot's or a container's /dev, a
tool's private node) opens the same drive.  So files are stat()ed, through /proc (the
descriptor itself, /proc/PID/map_files/START-END), never by name, but never on the calling
thread when the file lies on a file system that may not answer (FUSE, a network share, one
no mount table lists any more: lazily unmounted): its file system is known exactly from
/proc/PID/fdinfo's ``mnt_id`` (a mapping: its device number) and that process's mountinfo.
Those are stat()ed on worker threads, one per file system, within :data:`ASK_FILES` for all;
one that does not answer is given up on, and skipped while it stays hung (a later look costs
nothing).  A file system mounted ``nodev`` cannot have an open device, so its files are not
looked at unless written and possibly a loop device's backing file.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Hashable, Iterable

from popsicle_py import sysfs
from popsicle_py.drives.model import Inode
from popsicle_py.drives.system import DeviceNames
from popsicle_py.records import record

#: File systems whose stat() is answered from memory or a local disk: never a hang.
LOCAL_FILE_SYSTEMS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "bcachefs", "f2fs", "jfs", "reiserfs", "nilfs2",
    "zfs", "vfat", "msdos", "exfat", "ntfs", "ntfs3", "hfs", "hfsplus", "udf", "iso9660",
    "squashfs", "erofs", "tmpfs", "ramfs", "devtmpfs", "devpts", "proc", "sysfs", "mqueue",
    "hugetlbfs", "cgroup", "cgroup2", "bpf", "tracefs", "debugfs", "securityfs", "configfs",
    "pstore", "efivarfs", "binfmt_misc",
})

#: Seconds the files on other file systems are given, all together, to answer a stat().
ASK_FILES = 2.0

_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


@record
class Held:
    """A block device, or a regular file written, that a process holds."""

    pid: int
    name: str  # as the process names it (its descriptor's link, its mapping's path)
    mode: int  # st_mode: a block device or a regular file
    rdev: int
    inode: Inode
    writing: bool  # opened for writing; a shared writable mapping


@record
class FileSystem:
    """What a descriptor's or mapping's file system allows: a stat() on this thread
    (``local``), an open device (not ``nodev``); ``key`` groups its files on one worker."""

    key: Hashable
    local: bool
    nodev: bool


_UNKNOWN_DEV = "dev"


@functools.lru_cache(maxsize=16)
def _mountinfo(text: str) -> tuple[tuple[int, int, str, bool], ...]:
    """(mount id, device number, type, nodev) of each line of a mountinfo."""
    found: list[tuple[int, int, str, bool]] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or not tail or not fields[0].isdigit():
            continue
        major, _, minor = fields[2].partition(":")
        if not (major.isdigit() and minor.isdigit()):
            continue
        found.append((int(fields[0]), os.makedev(int(major), int(minor)), tail[0],
                      "nodev" in fields[5].split(",")))
    return tuple(found)


class Mounts:
    """Every mount namespace's mounts, each read once when one of its processes needs it:
    which file system a mount id (fdinfo) or a device number (a mapping) is."""

    def __init__(self) -> None:
        self.by_id: dict[int, FileSystem] = {}
        self.by_dev: dict[int, FileSystem] = {}
        self.namespaces: set[str] = set()
        self.own = self._learn("self")

    def ours(self, pid: int) -> bool:
        """Whether the process is in our mount namespace: its /dev is ours."""
        try:
            return os.readlink(f"/proc/{pid}/ns/mnt") == self.own
        except OSError:
            return False

    def _learn(self, pid: int | str) -> str:
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            namespace = f"?{pid}"
        if namespace in self.namespaces:
            return namespace
        self.namespaces.add(namespace)
        for mount_id, dev, fstype, nodev in _mountinfo(sysfs.read(f"/proc/{pid}/mountinfo")
                                                        or ""):
            local = fstype in LOCAL_FILE_SYSTEMS
            self.by_id[mount_id] = FileSystem(("mount", mount_id), local, nodev)
            known = self.by_dev.get(dev)  # one super block, mounted many times
            self.by_dev[dev] = FileSystem((_UNKNOWN_DEV, dev), local and (
                known is None or known.local), nodev and (known is None or known.nodev))
        return namespace

    def of_mount(self, pid: int, mount_id: int) -> FileSystem:
        if mount_id not in self.by_id:
            self._learn(pid)
        # Not in any table: lazily unmounted, whatever it was.
        return self.by_id.get(mount_id) or FileSystem(("mount", mount_id), False, False)

    def of_device(self, pid: int, dev: int) -> FileSystem:
        if dev not in self.by_dev:
            self._learn(pid)
        return self.by_dev.get(dev) or FileSystem((_UNKNOWN_DEV, dev), False, False)


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


def _pids() -> list[int]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit())


#: One file to stat: (pid, its /proc link, its name as the process names it, written).
_Look = tuple[int, str, str, bool]


def start_quiet(target: Callable[..., None], *args: object, name: str) -> None:
    """Start a daemon thread with the stop signals blocked, which it keeps, as
    :func:`~.system.loop_statuses` does: one left blocked in the kernel (a hung share, a
    dying drive) must never be the thread a Ctrl-C is delivered to, where it would wait
    unseen while the main thread waits for it."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        threading.Thread(target=target, args=args, name=name, daemon=True).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


#: File systems whose worker has not returned yet (a hung share): not asked again meanwhile.
_hung: set[Hashable] = set()
_hung_lock = threading.Lock()


def stat_elsewhere(groups: dict[Hashable, list[str]], timeout: float = ASK_FILES
                   ) -> dict[str, os.stat_result]:
    """stat() each path on a thread of its file system's own, all within one ``timeout``:
    those that answered.  A file system still hung from an earlier look is not asked; one
    that hangs now hides no other, and is never waited for again until it answers."""
    with _hung_lock:
        groups = {key: paths for key, paths in groups.items() if key not in _hung}
        _hung.update(groups)
    results: dict[str, os.stat_result] = {}
    lock = threading.Lock()
    all_done = threading.Event()
    waiting = set(groups)

    def work(key: Hashable, paths: list[str]) -> None:
        try:
            for path in paths:
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                with lock:
                    results[path] = st
        finally:
            with _hung_lock:
                _hung.discard(key)
            with lock:
                waiting.discard(key)
                if not waiting:
                    all_done.set()

    for key, paths in groups.items():
        start_quiet(work, key, paths, name="popsicle-stat")
    if groups:
        all_done.wait(timeout)
    with lock:
        return dict(results)


class _Scan:
    """One look at every process: what is stat()ed here, what on workers, what it found."""

    def __init__(self, backing_files: frozenset[Inode]) -> None:
        self.in_dev = DeviceNames().in_dev
        self.mounts = Mounts()
        self.backing_files = backing_files
        self.inos = frozenset(ino for _, ino in backing_files)
        self.found: list[Held] = []
        self.elsewhere: dict[Hashable, list[_Look]] = {}
        self.mapped: dict[tuple[int, int], os.stat_result] = {}

    def wanted_file(self, writing: bool, ino: int | None) -> bool:
        """Whether a written file may be a loop device's backing file (worth a stat)."""
        return writing and bool(self.inos) and (ino is None or ino in self.inos)

    def take(self, look: _Look, st: os.stat_result) -> None:
        pid, _, name, writing = look
        inode = (st.st_dev, st.st_ino)
        if stat.S_ISBLK(st.st_mode) or (stat.S_ISREG(st.st_mode) and writing
                                        and inode in self.backing_files):
            self.found.append(Held(pid, name.removesuffix(" (deleted)"), st.st_mode,
                                   st.st_rdev, inode, writing))

    def here_or_elsewhere(self, look: _Look, where: FileSystem) -> None:
        if not where.local:
            self.elsewhere.setdefault(where.key, []).append(look)
            return
        try:
            st = os.stat(look[1])
        except OSError:
            return
        self.take(look, st)

    def descriptors(self, pid: int) -> bool:
        """Look at a process's descriptors; whether it had any (a kernel thread has none)."""
        directory = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(directory)
        except OSError:
            return False
        ours: bool | None = None
        for fd in fds:
            link = f"{directory}/{fd}"
            try:
                name = os.readlink(link)
            except OSError:
                continue
            if not name.startswith("/"):
                continue  # a pipe, a socket, an anonymous inode
            if ours is None and name.startswith("/dev/"):
                ours = self.mounts.ours(pid)
            if ours and self.in_dev(name):  # devtmpfs answers at once; most are no disks
                try:
                    st = os.stat(link)
                except OSError:
                    continue
                if stat.S_ISBLK(st.st_mode) and (info := fdinfo(pid, fd)) is not None:
                    self.take((pid, link, name, info[0]), st)
                continue
            info = fdinfo(pid, fd)
            if info is None:
                continue  # closed meanwhile: holds nothing
            writing, mount_id, ino = info
            where = (self.mounts.of_mount(pid, mount_id) if mount_id is not None
                     else FileSystem(("pid", pid), False, False))
            if where.nodev and not self.wanted_file(writing, ino):
                continue
            self.here_or_elsewhere((pid, link, name, writing), where)
        return bool(fds)

    def mappings(self, pid: int) -> None:
        """File mappings that may be of a device (shared ones, names in /dev): a program that
        mapped a drive and closed its descriptor still reads and writes it."""
        data = _read_all(f"/proc/{pid}/maps")
        for line in _candidate_lines(data):
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
            where = self.mounts.of_device(pid, dev)
            if (where.nodev and not self.wanted_file(writing, ino)) or (
                    perms[3:4] != b"s" and not self.in_dev(name)):
                continue
            look = (pid, link, name, writing)
            if not where.local:
                self.here_or_elsewhere(look, where)
                continue
            st = self.mapped.get((dev, ino))  # each library once, not once per process
            if st is None:
                st = _stat_mapping(link, name, self.in_dev(name))
            if st is not None:
                self.mapped[(dev, ino)] = st
                self.take(look, st)

    def finish(self) -> list[Held]:
        answered = stat_elsewhere({key: [look[1] for look in looks]
                                   for key, looks in self.elsewhere.items()})
        for looks in self.elsewhere.values():
            for look in looks:
                if look[1] in answered:
                    self.take(look, answered[look[1]])
        return self.found


def _stat_mapping(link: str, name: str, in_dev: bool) -> os.stat_result | None:
    """The mapped file, through map_files (root only); else by its name when in /dev."""
    try:
        return os.stat(link)
    except PermissionError:
        pass
    except OSError:
        return None
    try:
        return os.stat(name) if in_dev else None
    except OSError:
        return None


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
        while chunk := os.read(handle, 1 << 16):
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
    scan = _Scan(backing_files)
    ours = os.getpid()
    for pid in _pids():
        if pid != ours and (scan.descriptors(pid) or _has_memory(pid)):
            scan.mappings(pid)
    return scan.finish()


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
