"""System facts, read from sysfs and /proc: mounts, swaps, what a disk is stored on, holders.

A loop device is judged by what backs it (a block device, recursively; a file, with every
other loop device and mount using that file), and the devices of a mounted multi-device
btrfs, or the layers of an overlay, count as that filesystem's.  :func:`backing_of` is that
walk; :func:`gather_facts` reads everything :func:`~.rules.system_reason` and
:func:`~.rules.holder_reasons` need, once: besides our own mounts, those of every other mount
namespace (:func:`foreign_mounts`), loop devices over block devices (:func:`loops_over_devices`)
and the block devices other processes hold open (:func:`openers`).
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass

from popsicle_py import media, sysfs
from popsicle_py.drives.model import (
    Backing,
    Inode,
    LoopKey,
    LoopOver,
    Mount,
    Opener,
    Process,
    Swap,
    SystemFacts,
)

_sys_dev = sysfs.block_dir
_read = sysfs.read


def parse_devnum(text: str | None) -> int | None:
    if not text or ":" not in text:
        return None
    major, _, minor = text.partition(":")
    try:
        return os.makedev(int(major), int(minor))
    except ValueError:
        return None


def stack_of(devnum: int) -> frozenset[int]:
    """``devnum`` and every block device beneath it, from sysfs.

    A partition rests on its disk, a dm/md device on its ``slaves``, a loop device on its
    backing device or on the devices holding its backing file (through btrfs and overlay).
    Walking down this way is how a mount of /dev/dm-0 (LVM, LUKS) or of a loop device protects
    the physical disk.
    """
    return backing_of(devnum).all_devnums


def backing_of(devnum: int) -> Backing:
    """Walk down from the disk ``devnum``: what writing it overwrites, and what it rests on."""
    data: set[int] = set()
    files: set[Inode] = set()
    under: set[int] = set()
    under_files: set[Inode] = set()
    name: str | None = None
    seen: set[tuple[int, bool]] = set()
    todo = [(devnum, True)]  # (device, whether its bytes are the disk's bytes)
    while todo:
        current, written = todo.pop()
        if (current, written) in seen:
            continue
        seen.add((current, written))
        (data if written else under).add(current)
        base = _sys_dev(current)
        if not os.path.exists(base):
            continue
        real = os.path.realpath(base)
        if os.path.exists(os.path.join(real, "partition")):
            parent = parse_devnum(_read(os.path.join(os.path.dirname(real), "dev")))
            if parent is not None:
                todo.append((parent, written))
        slaves = os.path.join(real, "slaves")
        if os.path.isdir(slaves):
            for slave_name in sorted(os.listdir(slaves)):
                slave = parse_devnum(_read(os.path.join(slaves, slave_name, "dev")))
                if slave is not None:
                    todo.append((slave, written))
        backing = _read(os.path.join(real, "loop", "backing_file"))
        if not backing:
            continue
        if current == devnum:
            name = backing
        try:
            st = os.stat(backing)
        except OSError:
            continue  # deleted since it was attached: nothing left to find by its name
        if stat.S_ISBLK(st.st_mode):
            todo.append((st.st_rdev, written))
            continue
        inode = (st.st_dev, st.st_ino)
        (files if written else under_files).add(inode)
        for holder in devnums_holding(backing):
            todo.append((holder, False))
    data_set = frozenset(data)
    return Backing(data_set, frozenset(files), frozenset(under) - data_set,
                   frozenset(under_files) - frozenset(files), name)


def _devnums_of_file(path: str) -> list[int]:
    """Block device numbers a path stands for: the device itself, or the one holding the file."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    numbers = [st.st_dev]
    if stat.S_ISBLK(st.st_mode):
        numbers.append(st.st_rdev)
    return numbers


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo, as much of it as the rules need."""

    devnum: int  # the filesystem's st_dev (anonymous for btrfs, overlay, tmpfs...)
    mountpoint: str
    fstype: str
    source: str
    options: str  # the superblock's options (overlay layers are here)
    #: Propagation: the peer group it shares (``shared:N``) and the one it receives from
    #: (``master:N``); an unmount in a group reaches every member and slave of it.
    shared: int | None = None
    master: int | None = None
    mount_id: int = 0
    parent_id: int = 0


def _unescape_mount(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table(text: str | None = None) -> list[MountEntry]:
    """/proc/self/mountinfo parsed (``text`` for tests)."""
    if text is None:
        text = _read("/proc/self/mountinfo") or ""
    entries: list[MountEntry] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        devnum = parse_devnum(fields[2])
        if devnum is None:
            continue
        tags = dict(tag.partition(":")[::2] for tag in fields[6:])
        entries.append(MountEntry(devnum, _unescape_mount(fields[4]), tail[0],
                                  _unescape_mount(tail[1]), tail[2] if len(tail) > 2 else "",
                                  _group(tags.get("shared")), _group(tags.get("master")),
                                  _group(fields[0]) or 0, _group(fields[1]) or 0))
    return entries


def _group(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def overlay_layers(options: str) -> list[str]:
    """Directories an overlay is made of (lowerdir, upperdir, workdir...) from its options."""
    layers: list[str] = []
    for option in re.split(r"(?<!\\),", options):
        key, _, value = option.partition("=")
        if key in ("lowerdir", "lowerdir+", "upperdir", "workdir", "datadir+") and value:
            for layer in re.split(r"(?<!\\):", value):
                layer = _unescape_mount(layer).replace("\\:", ":").replace("\\,", ",")
                if layer:
                    layers.append(layer)
    return layers


def btrfs_groups() -> list[frozenset[int]]:
    """The devices of each btrfs filesystem the kernel has open (/sys/fs/btrfs/*/devices)."""
    root = f"{sysfs.ROOT}/fs/btrfs"
    groups: list[frozenset[int]] = []
    try:
        fsids = sorted(os.listdir(root))
    except OSError:
        return groups
    for fsid in fsids:
        directory = os.path.join(root, fsid, "devices")
        if not os.path.isdir(directory):
            continue
        members = {parse_devnum(_read(os.path.join(directory, n, "dev")))
                   for n in os.listdir(directory)}
        group = frozenset(n for n in members if n is not None)
        if group:
            groups.append(group)
    return groups


def _btrfs_group(devnums: Iterable[int]) -> frozenset[int]:
    wanted = set(devnums)
    return frozenset().union(*(g for g in btrfs_groups() if g & wanted))


def _mount_of(path: str, table: list[MountEntry], devnum: int | None = None
              ) -> MountEntry | None:
    """The mount a path lies in: the longest mountpoint above it (the last one stacked),
    preferring mounts whose filesystem is the file's own ``devnum`` (st_dev)."""
    real = os.path.realpath(path)
    best: MountEntry | None = None

    def rank(entry: MountEntry) -> tuple[bool, int]:
        return entry.devnum == devnum, len(entry.mountpoint)

    for entry in table:
        mp = entry.mountpoint
        inside = real == mp or real.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or rank(entry) >= rank(best)):
            best = entry
    return best


def devnums_holding(path: str, _depth: int = 0) -> frozenset[int]:
    """Block devices that store the file ``path``: its filesystem's disk or disks.

    Most filesystems report their disk as the file's st_dev.  btrfs reports an anonymous
    number: every device of that filesystem holds the file.  An overlay's files live in its
    layers: the devices holding each layer directory hold it.
    """
    try:
        st = os.stat(path)
    except OSError:
        return frozenset()
    numbers = {st.st_dev}
    if os.path.exists(_sys_dev(st.st_dev)) or _depth > 8:
        return frozenset(numbers)
    entry = _mount_of(path, mount_table(), st.st_dev)
    if entry is None:
        return frozenset(numbers)
    return frozenset(numbers | _entry_devnums(entry, _depth))


def _entry_devnums(entry: MountEntry, depth: int = 0) -> set[int]:
    """Block devices a mount's filesystem stores its data on (not yet walked down)."""
    numbers: set[int] = set()
    if os.path.exists(_sys_dev(entry.devnum)):
        numbers.add(entry.devnum)
    if entry.source.startswith("/"):
        try:
            st = os.stat(entry.source)
        except OSError:
            st = None
        if st is not None and stat.S_ISBLK(st.st_mode):
            numbers.add(st.st_rdev)
    if entry.fstype == "btrfs":
        numbers |= _btrfs_group(numbers)
    elif entry.fstype == "overlay":
        for layer in overlay_layers(entry.options):
            numbers |= devnums_holding(layer, depth + 1)
    return numbers


def _file_source(entry: MountEntry) -> Inode | None:
    """A filesystem mounted straight from a regular file (FUSE image drivers do this)."""
    if not entry.source.startswith("/"):
        return None
    try:
        st = os.stat(entry.source)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def current_mounts(table: list[MountEntry] | None = None) -> tuple[Mount, ...]:
    """Every mount that rests on a block device or a file, in mount-table order.

    A btrfs filesystem rests on all its devices, an overlay on the devices of its layers;
    "/dev/root" and other unnamed roots are found by the filesystem's own device number.
    ``table``: our own namespace's :func:`mount_table`, when already read.
    """
    mounts: list[Mount] = []
    for entry in mount_table() if table is None else table:
        numbers = _entry_devnums(entry)
        source_file = _file_source(entry)
        if not numbers and source_file is None:
            continue
        devnums: set[int] = set()
        files: set[Inode] = {source_file} if source_file else set()
        for number in numbers:
            backing = backing_of(number)
            devnums |= backing.all_devnums
            files |= backing.all_files
        mounts.append(Mount(entry.source, entry.mountpoint, frozenset(devnums),
                            frozenset(files)))
    return tuple(mounts)


def path_storage(path: str) -> tuple[frozenset[int], frozenset[Inode]]:
    """Every block device and backing file a path (a swap file, the image) rests on.

    A regular file: its own inode, the disks holding it, and what those rest on.  A block
    device: the device and what it rests on.
    """
    try:
        st = os.stat(path)
    except OSError:
        return frozenset(), frozenset()
    if stat.S_ISBLK(st.st_mode):
        starts: frozenset[int] = frozenset({st.st_rdev})
        files: set[Inode] = set()
    else:
        starts = devnums_holding(path)
        files = {(st.st_dev, st.st_ino)} if stat.S_ISREG(st.st_mode) else set()
    devnums: set[int] = set()
    for number in starts:
        backing = backing_of(number)
        devnums |= backing.all_devnums
        files |= backing.all_files
    return frozenset(devnums), frozenset(files)


def current_swaps() -> tuple[Swap, ...]:
    """Active swap areas from /proc/swaps, with the devices and files they rest on."""
    text = _read("/proc/swaps") or ""
    swaps: list[Swap] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if not fields:
            continue
        path = _unescape_mount(fields[0])
        devnums, files = path_storage(path)
        if devnums or files:
            swaps.append(Swap(path, devnums, files))
    return tuple(swaps)


def gather_facts(image_path: str | None = None,
                 of: frozenset[int] | None = None) -> SystemFacts:
    """Mounts, swaps, where the image lives, holders (of ``of``: :func:`openers`)."""
    image_devnums: frozenset[int] = frozenset()
    image_files: frozenset[Inode] = frozenset()
    image_inode: Inode | None = None
    if image_path:
        image_devnums, image_files = path_storage(image_path)
        try:
            st = os.stat(image_path)
            image_inode = (st.st_dev, st.st_ino)
        except OSError:
            pass
    own = mount_table()
    return SystemFacts(current_mounts(own), current_swaps(), image_devnums, image_inode,
                       image_files, foreign_mounts(own), loops_over_devices(), openers(of))


def holders_beneath(backing: Backing, devnum: int) -> tuple[str, ...]:
    """Devices stacked on what backs a loop device (dm over its backing device...)."""
    found: dict[str, None] = {}
    for number in sorted(backing.devnums - {devnum}):
        base = _sys_dev(number)
        if not os.path.exists(base):
            continue
        real = os.path.realpath(base)
        dirs = [real] + [os.path.join(real, n) for n in sorted(os.listdir(real))
                         if os.path.exists(os.path.join(real, n, "partition"))]
        for directory in dirs:
            holders = os.path.join(directory, "holders")
            if os.path.isdir(holders):
                for name in sorted(os.listdir(holders)):
                    found.setdefault(f"/dev/{name}", None)
    return tuple(found)


def loop_key(path: str, devnum: int) -> LoopKey | None:
    """What a loop device stands on: LOOP_GET_STATUS64 on a read-only descriptor (exact even
    when the backing file was renamed), else sysfs."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return media.loop_key_of_sysfs(devnum)
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode) and os.fstat(fd).st_rdev == devnum:
            key = media.loop_key_of_fd(fd)
            if key is not None:
                return key
    finally:
        os.close(fd)
    return media.loop_key_of_sysfs(devnum)


# -- Holders: what other namespaces mount, loop devices over disks, who has a disk open -----


def _pids() -> list[int]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit())


def _program(pid: int) -> str:
    return _read(f"/proc/{pid}/comm") or "?"


class _Backings:
    """:func:`backing_of` once per device for one gathering (many mounts share a device)."""

    def __init__(self) -> None:
        self.known: dict[int, Backing] = {}

    def __call__(self, devnum: int) -> Backing:
        if devnum not in self.known:
            self.known[devnum] = backing_of(devnum)
        return self.known[devnum]


def _namespace_devnums(entry: MountEntry, pid: int) -> set[int]:
    """Block devices a mount of another namespace stores its data on; its source is a path
    in that namespace, so it is looked up through the process's root."""
    numbers: set[int] = set()
    if os.path.exists(_sys_dev(entry.devnum)):
        numbers.add(entry.devnum)
    if entry.source.startswith("/dev/"):
        try:
            st = os.stat(f"/proc/{pid}/root{entry.source}")
        except OSError:
            st = None
        if st is not None and stat.S_ISBLK(st.st_mode):
            numbers.add(st.st_rdev)
    if entry.fstype == "btrfs" and numbers:
        numbers |= _btrfs_group(numbers)
    return numbers


def foreign_mounts(own: list[MountEntry] | None = None) -> tuple[Mount, ...]:
    """Mounts resting on block devices in every other mount namespace, one process each.

    A mount made inside ``unshare -m`` (a container, a service with PrivateMounts) is in no
    table of ours.  A copy that our unmount removes too is left out: ``--unmount`` covers it
    (see :func:`_follows`).  Namespaces of processes we may not inspect (another user's,
    without root) are not seen.
    """
    try:
        ours = os.readlink("/proc/self/ns/mnt")
    except OSError:
        return ()
    groups = _unmount_groups(mount_table() if own is None else own)
    seen = {ours}
    backing = _Backings()
    found: list[Mount] = []
    for pid in _pids():
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            continue
        if namespace in seen:
            continue
        text = _read(f"/proc/{pid}/mountinfo")
        if not text:
            continue
        seen.add(namespace)
        process = Process(pid, _program(pid))
        table = mount_table(text)
        parents = {e.mount_id: e for e in table}
        for entry in table:
            if _follows(entry, parents.get(entry.parent_id), groups):
                continue
            numbers = _namespace_devnums(entry, pid)
            if not numbers:
                continue
            devnums = frozenset().union(*(backing(n).all_devnums for n in numbers))
            found.append(Mount(entry.source, entry.mountpoint, devnums, namespace=process,
                               sources=frozenset(numbers)))
    return tuple(found)


def _unmount_groups(own: list[MountEntry]) -> dict[tuple[int, str], set[int]]:
    """For each of our mounts (device, mountpoint), the peer group its parent shares: an
    unmount propagates through the parent's group, never through the mount's own."""
    parents = {e.mount_id: e for e in own}
    groups: dict[tuple[int, str], set[int]] = {}
    for entry in own:
        parent = parents.get(entry.parent_id)
        if parent is not None and parent.shared:
            groups.setdefault((entry.devnum, entry.mountpoint), set()).add(parent.shared)
    return groups


def _follows(entry: MountEntry, parent: MountEntry | None,
             groups: dict[tuple[int, str], set[int]]) -> bool:
    """Whether our unmount of the same mount removes this copy in another namespace: its
    parent is a peer (``shared:N``) or a slave (``master:N``) of our mount's parent, as on a
    desktop whose services' namespaces are slaves of the host's.  Seen here: with a private
    parent, nothing propagates, whatever the mount's own group."""
    ours = groups.get((entry.devnum, entry.mountpoint))
    if not ours or parent is None:
        return False
    return parent.shared in ours or parent.master in ours


def _block_names() -> set[str]:
    try:
        return set(os.listdir(f"{sysfs.ROOT}/class/block"))
    except OSError:
        return set()


def _may_be_device(path: str, names: set[str]) -> bool:
    """Whether a path may name a block device: under /dev, or named like one (a chroot's
    /dev).  Other files are never stat()ed: one on a hung network or FUSE mount would hang."""
    path = path.removesuffix(" (deleted)")
    return path.startswith("/dev/") or os.path.basename(path) in names


def loops_over_devices() -> tuple[LoopOver, ...]:
    """Loop devices whose backing file is a block device, at whatever offset."""
    names = _block_names()
    backing = _Backings()
    found: list[LoopOver] = []
    for name in sorted(n for n in names if n.startswith("loop")):
        base = f"{sysfs.ROOT}/class/block/{name}"
        source = _read(f"{base}/loop/backing_file")
        if not source or not _may_be_device(source, names):
            continue
        try:
            st = os.stat(source)
        except OSError:
            continue
        devnum = parse_devnum(_read(f"{base}/dev"))
        if not stat.S_ISBLK(st.st_mode) or devnum is None:
            continue
        offset = _read(f"{base}/loop/offset") or "0"
        found.append(LoopOver(f"/dev/{name}", devnum, int(offset) if offset.isdigit() else 0,
                              backing(st.st_rdev).devnums))
    return tuple(found)


def _writing(pid: int, fd: str) -> bool:
    """Whether a descriptor was opened O_WRONLY or O_RDWR (/proc/PID/fdinfo ``flags``)."""
    for line in (_read(f"/proc/{pid}/fdinfo/{fd}") or "").splitlines():
        key, _, value = line.partition(":")
        if key == "flags":
            try:
                return (int(value.strip(), 8) & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
            except ValueError:
                return True
    return True  # unknown: assume the worst


#: Seconds between the two looks at the open descriptors (see :func:`openers`).
SETTLE = 0.1


def openers(of: frozenset[int] | None = None) -> tuple[Opener, ...]:
    """Block devices other processes hold open, as ``fuser`` finds them (/proc/PID/fd).

    With or without O_EXCL (``dd`` reading it, ``sleep 60 < /dev/sdb``); ours do not count.
    Looked at twice, SETTLE apart, when one of ``of`` (None: any device) is open: a process
    that had it open for a moment only (``losetup``, a udev worker) holds nothing, and refusing
    it would fail runs at random; other devices' openers refuse nothing of ``of`` (no wait).
    """
    first = _scan_openers()
    if not any(of is None or o.devnums & of for o in first):
        return first
    time.sleep(SETTLE)
    seen = {(o.process.pid, o.devnum) for o in first}
    return tuple(o for o in _scan_openers() if (o.process.pid, o.devnum) in seen)


def _scan_openers() -> tuple[Opener, ...]:
    names = _block_names()
    ours = os.getpid()
    backing = _Backings()
    found: list[Opener] = []
    for pid in _pids():
        if pid == ours:
            continue
        directory = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(directory)
        except OSError:
            continue
        program: str | None = None
        for fd in fds:
            try:
                link = os.readlink(f"{directory}/{fd}")
            except OSError:
                continue
            if not link.startswith("/") or not _may_be_device(link, names):
                continue
            try:
                st = os.stat(f"{directory}/{fd}")
            except OSError:
                continue
            if not stat.S_ISBLK(st.st_mode):
                continue
            program = program or _program(pid)
            found.append(Opener(Process(pid, program), link.removesuffix(" (deleted)"),
                                st.st_rdev, backing(st.st_rdev).devnums, _writing(pid, fd)))
    return tuple(found)
