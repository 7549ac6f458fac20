"""System facts, read from sysfs and /proc: mounts, swaps, what a disk is stored on.

A loop device is judged by what backs it (a block device, recursively; a file, with every
other loop device and mount using that file), and the devices of a mounted multi-device
btrfs, or the layers of an overlay, count as that filesystem's.  :func:`backing_of` is that
walk.  What other namespaces mount and who holds a disk open is :mod:`.holders`, whose
:func:`~.holders.gather_facts` reads everything the rules need, once.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from collections.abc import Iterable

from popsicle_py import media, sysfs
from popsicle_py.drives.asking import ASK_SOURCES, ask_each, in_time
from popsicle_py.drives.model import (
    Backing,
    Inode,
    LoopAnswers,
    LoopKey,
    Mount,
    Swap,
)
from popsicle_py.records import record

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


def backing_of(devnum: int, answers: LoopAnswers | None = None) -> Backing:
    """Walk down from the disk ``devnum``: what writing it overwrites, and what it rests on.

    ``answers``: what the kernel already said of the loop devices (:func:`ask_loops`); a
    loop device not among them is asked now."""
    data: set[int] = set()
    files: set[Inode] = set()
    under: set[int] = set()
    under_files: set[Inode] = set()
    name: str | None = None
    unknown: str | None = None
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
        answered, key = _ask(current, answers)
        if not answered and current != devnum:  # the drive itself: refused, never guessed
            key = named_device(backing, current)
        if not answered and key is None:
            if written:
                unknown = (f"backed by {backing}, which does not answer (a file on a hung "
                           "network or FUSE mount?)")
            continue
        stored = loop_storage(backing, key)
        if stored is None:
            if written:
                unknown = (f"backed by {backing}, which cannot be found by that name (deleted, "
                           "renamed, or attached in another mount namespace), so what writing "
                           "it overwrites is unknown")
            continue
        if stored.rdev:
            todo.append((stored.rdev, written))
            continue
        (files if written else under_files).add(stored.inode)
        for holder in stored.holders:
            todo.append((holder, False))
    data_set = frozenset(data)
    return Backing(data_set, frozenset(files), frozenset(under) - data_set,
                   frozenset(under_files) - frozenset(files), name, unknown)


@record
class LoopStorage:
    """What a loop device stands on: a block device (``rdev``), or a file (``inode``) and
    the block devices holding that file."""

    rdev: int
    inode: Inode
    holders: frozenset[int]


def loop_status(devnum: int) -> LoopKey | None:
    """The kernel's word on what the loop device ``devnum`` stands on (LOOP_GET_STATUS64 on
    its /dev node, opened read-only); without it (no node, not root), the name sysfs shows,
    stat()ed; None when neither tells (unbound, or a name that finds nothing).  Unlike the
    name, the kernel's word holds when the file was deleted, renamed, or attached in another
    mount namespace (a container's path).  Either may hang on a file of a hung mount: ask it
    through :func:`loop_statuses`."""
    return loop_key(f"/dev/{os.path.basename(os.path.realpath(_sys_dev(devnum)))}", devnum)


#: Seconds the kernel is given to say what a loop device stands on.  It stats the backing
#: file to answer: one on a hung network or FUSE mount never answers.
ASK_LOOPS = 2.0


def loop_statuses(devnums: list[int], timeout: float = ASK_LOOPS) -> dict[int, LoopKey | None]:
    """:func:`loop_status` of each loop device, each asked on a thread of its own, all
    within one ``timeout``: those that answered.  One that does not (its backing file is on
    a hung mount) is left out, hides no other, and is never waited for: listing drives must
    not hang, and many hung devices cost no more than one."""
    return ask_each(devnums, loop_status, timeout, "popsicle-loop-status")


def ask_loops() -> LoopAnswers:
    """What every bound loop device stands on, asked of the kernel once, on one thread."""
    try:
        names = os.listdir(f"{sysfs.ROOT}/class/block")
    except OSError:
        names = []
    base = f"{sysfs.ROOT}/class/block"
    devnums = [number for name in sorted(names) if name.startswith("loop")
               and os.path.exists(f"{base}/{name}/loop/backing_file")
               if (number := parse_devnum(_read(f"{base}/{name}/dev"))) is not None]
    keys = loop_statuses(devnums)
    return LoopAnswers(keys, frozenset(devnums) - keys.keys())


def _ask(devnum: int, answers: LoopAnswers | None) -> tuple[bool, LoopKey | None]:
    """(whether it answered, what it said) for one loop device."""
    if answers is not None:
        if devnum in answers.keys:
            return True, answers.keys[devnum]
        if devnum in answers.silent:
            return False, None
    found = loop_statuses([devnum])
    return devnum in found, found.get(devnum)


def source_stats(paths: Iterable[str], timeout: float = ASK_SOURCES
                 ) -> dict[str, os.stat_result | None]:
    """stat() of each path naming a mount's source (a FUSE image driver's file, a chroot's
    node): those in devtmpfs at once, the others each on a thread of its own, all within
    one ``timeout``; None for one that is not there.  One on a hung network or FUSE mount
    is left out and never waited for: it would hang ``list`` and every plan, Ctrl-C unheard
    (the mount's source names a file on another mount, which may hang)."""
    in_dev = DeviceNames().in_dev
    asked = list(dict.fromkeys(paths))
    found = {path: _stat_or_none(path) for path in asked if in_dev(path)}
    return {**found, **ask_each([p for p in asked if p not in found], _stat_or_none, timeout,
                                "popsicle-mount-source")}


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


class DeviceNames:
    """Which paths may name a block device: under /dev (but not in a file system mounted
    inside it, as /dev/shm is), or named like one (a chroot's /dev).  Other files are never
    stat()ed: one on a hung network or FUSE mount would hang (tests' FUSE drives live in
    /dev/shm).  Decided from the names alone, with no call on the path."""

    def __init__(self) -> None:
        try:
            self.names = set(os.listdir(f"{sysfs.ROOT}/class/block"))
        except OSError:
            self.names = set()
        self.inside_dev = tuple(f"{e.mountpoint.rstrip('/')}/" for e in mount_table()
                                if e.mountpoint.startswith("/dev/") and e.fstype != "devtmpfs")

    def __call__(self, path: str) -> bool:
        path = path.removesuffix(" (deleted)")
        return os.path.basename(path) in self.names or self.in_dev(path)

    def in_dev(self, path: str) -> bool:
        """Under /dev itself (devtmpfs): a stat there cannot hang."""
        return path.startswith("/dev/") and not path.startswith(self.inside_dev)


def named_device(backing: str, devnum: int, device_like: DeviceNames | None = None
                 ) -> LoopKey | None:
    """What a loop device that did not answer stands on, when sysfs names a node in /dev
    (devtmpfs answers whatever else hangs): a loop device over a disk is never lost that
    way.  A name elsewhere is not looked up: it is most likely the file that hangs."""
    if not (device_like or DeviceNames()).in_dev(backing):
        return None
    key = media.loop_key_of_sysfs(devnum)
    return key if key is not None and key.rdev else None


def loop_storage(backing: str, key: LoopKey | None) -> LoopStorage | None:
    """What a loop device stands on: sysfs names its backing ``backing``, and ``key`` is
    what :func:`loop_statuses` found (None: nothing can be known).

    No path is looked up unless the file's file system is found by no other means (a btrfs
    subvolume): the name is then followed only when it is that very file.
    """
    if key is None:
        return None
    inode = (key.dev, key.ino)
    if key.rdev:
        return LoopStorage(key.rdev, inode, frozenset())
    holders = filesystem_devnums(key.dev)
    if holders is None:
        path = backing.removesuffix(" (deleted)")
        try:
            found = os.stat(path)
            same = (found.st_dev, found.st_ino) == inode
        except OSError:
            same = False
        holders = devnums_holding(path) if same else frozenset()
    return LoopStorage(0, inode, holders)


def filesystem_devnums(dev: int) -> frozenset[int] | None:
    """The block devices of the filesystem whose files have st_dev ``dev``, found without a
    file's name: the disk itself, else what our mounts of that filesystem rest on (none for
    tmpfs or FUSE); None when no mount of ours has that number."""
    if os.path.exists(_sys_dev(dev)):
        return frozenset({dev})
    entries = [entry for entry in mount_table() if entry.devnum == dev]
    if not entries:
        return None
    stats = source_stats(e.source for e in entries if e.source.startswith("/"))
    return frozenset().union(*(_entry_devnums(entry, stats=stats) for entry in entries))


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


@record
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


def unescape_mount(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table(text: str | None = None) -> list[MountEntry]:
    """/proc/self/mountinfo parsed (``text`` for tests).

    Read anew at every call (a mount may come or go at any moment), parsed only when it
    changed: a plan of 32 loop devices asks for it once per backing file (issue 30).
    """
    if text is None:
        text = _read("/proc/self/mountinfo") or ""
    return list(_parse_mountinfo(text))


@functools.lru_cache(maxsize=8)
def _parse_mountinfo(text: str) -> tuple[MountEntry, ...]:
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
        entries.append(MountEntry(devnum, unescape_mount(fields[4]), tail[0],
                                  unescape_mount(tail[1]), tail[2] if len(tail) > 2 else "",
                                  _group(tags.get("shared")), _group(tags.get("master")),
                                  _group(fields[0]) or 0, _group(fields[1]) or 0))
    return tuple(entries)


def _group(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def overlay_layers(options: str) -> list[str]:
    """Directories an overlay is made of (lowerdir, upperdir, workdir...) from its options."""
    layers: list[str] = []
    for option in re.split(r"(?<!\\),", options):
        key, _, value = option.partition("=")
        if key in ("lowerdir", "lowerdir+", "upperdir", "workdir", "datadir+") and value:
            for layer in re.split(r"(?<!\\):", value):
                layer = unescape_mount(layer).replace("\\:", ":").replace("\\,", ",")
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


def btrfs_group(devnums: Iterable[int]) -> frozenset[int]:
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
    return frozenset(numbers | _entry_devnums(entry, _depth, source_stats(
        [entry.source] if entry.source.startswith("/") else [])))


def _entry_devnums(entry: MountEntry, depth: int = 0,
                   stats: dict[str, os.stat_result | None] | None = None) -> set[int]:
    """Block devices a mount's filesystem stores its data on (not yet walked down); its
    source as :func:`source_stats` found it (``stats``)."""
    numbers: set[int] = set()
    if os.path.exists(_sys_dev(entry.devnum)):
        numbers.add(entry.devnum)
    st = (stats or {}).get(entry.source)
    if st is not None and stat.S_ISBLK(st.st_mode):
        numbers.add(st.st_rdev)
    if entry.fstype == "btrfs":
        numbers |= btrfs_group(numbers)
    elif entry.fstype == "overlay":  # a layer on a hung share never answers: 2 s for all
        numbers |= in_time(lambda: set().union(*(devnums_holding(layer, depth + 1) for layer
                                                in overlay_layers(entry.options))), set())
    return numbers


def _file_source(entry: MountEntry, stats: dict[str, os.stat_result | None]
                 ) -> Inode | None:
    """A filesystem mounted straight from a regular file (FUSE image drivers do this)."""
    st = stats.get(entry.source)
    return (st.st_dev, st.st_ino) if st is not None and stat.S_ISREG(st.st_mode) else None


def current_mounts(table: list[MountEntry] | None = None,
                   answers: LoopAnswers | None = None) -> tuple[Mount, ...]:
    """Every mount that rests on a block device or a file, in mount-table order.

    A btrfs filesystem rests on all its devices, an overlay on the devices of its layers;
    "/dev/root" and other unnamed roots are found by the filesystem's own device number.
    ``table``: our own namespace's :func:`mount_table`, when already read.
    """
    mounts: list[Mount] = []
    entries = mount_table() if table is None else table
    stats = source_stats(e.source for e in entries if e.source.startswith("/"))
    for entry in entries:
        numbers = _entry_devnums(entry, stats=stats)
        source_file = _file_source(entry, stats)
        if not numbers and source_file is None:
            continue
        devnums: set[int] = set()
        files: set[Inode] = {source_file} if source_file else set()
        for number in numbers:
            backing = backing_of(number, answers)
            devnums |= backing.all_devnums
            files |= backing.all_files
        mounts.append(Mount(entry.source, entry.mountpoint, frozenset(devnums),
                            frozenset(files)))
    return tuple(mounts)


def path_storage(path: str, answers: LoopAnswers | None = None
                 ) -> tuple[frozenset[int], frozenset[Inode]]:
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
        backing = backing_of(number, answers)
        devnums |= backing.all_devnums
        files |= backing.all_files
    return frozenset(devnums), frozenset(files)


def current_swaps(answers: LoopAnswers | None = None) -> tuple[Swap, ...]:
    """Active swap areas from /proc/swaps, with the devices and files they rest on."""
    text = _read("/proc/swaps") or ""
    swaps: list[Swap] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if not fields:
            continue
        path = unescape_mount(fields[0])
        if path.startswith("/") and source_stats([path]).get(path) is None:
            continue  # gone, or a swap file on a hung NFS server: no drive of ours
        devnums, files = path_storage(path, answers)
        if devnums or files:
            swaps.append(Swap(path, devnums, files))
    return tuple(swaps)


def holders_beneath(backing: Backing, devnum: int) -> tuple[str, ...]:
    """Devices stacked on what backs a loop device (dm over its backing device...)."""
    return _stacked(sorted(backing.devnums - {devnum}))


def stacked_on(devnum: int) -> tuple[str, ...]:
    """Devices stacked on the disk ``devnum`` or a partition of it now (sysfs ``holders/``:
    device-mapper, md RAID), as ``/dev`` names."""
    return _stacked([devnum])


def _stacked(numbers: list[int]) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for number in numbers:
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
                    found.setdefault(holder_named(name), None)
    return tuple(found)


#: What made a device-mapper device, by its uuid's prefix (cryptsetup, LVM, multipath set
#: one, kpartx ``part1-``; a plain ``dmsetup create`` none).
_DM_MAKERS = {"CRYPT": "dm-crypt encryption", "LVM": "LVM", "MPATH": "multipath",
              "PART": "a partition mapping", "STRATIS": "Stratis", "VDO": "VDO"}


def holder_kind(name: str) -> str:
    """What the device ``name`` (sysfs) stacked on a drive is, in words: md RAID, or what
    made a device-mapper device (its uuid's prefix), so that the user knows what to stop."""
    base = f"{sysfs.ROOT}/class/block/{name}"
    if os.path.isdir(f"{base}/md"):
        return "md RAID"
    if os.path.isdir(f"{base}/dm"):
        maker = (_read(f"{base}/dm/uuid") or "").split("-", 1)[0].upper().rstrip("0123456789")
        return _DM_MAKERS.get(maker, "a device-mapper mapping")
    return "a device stacked on it"


def holder_named(name: str) -> str:
    """``/dev/mapper/vg-lv (LVM)``: a holder as refusals name it."""
    return f"{holder_path(name)} ({holder_kind(name)})"


def holder_path(name: str) -> str:
    """How to name the device ``name`` (sysfs) stacked on a drive: a device-mapper volume
    by its /dev/mapper link (``/dev/mapper/luks-...``, ``/dev/mapper/vg-lv``: what the user
    made, not ``/dev/dm-0``) when that link is there and is that device."""
    node = f"/dev/{name}"
    mapped = _read(f"{sysfs.ROOT}/class/block/{name}/dm/name")
    if not mapped or "/" in mapped:
        return node
    link = f"/dev/mapper/{mapped}"
    try:
        same = os.stat(link).st_rdev == os.stat(node).st_rdev  # in devtmpfs: never hangs
    except OSError:
        return node
    return link if same else node


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
    return media.loop_key_of_sysfs(devnum)  # a chroot's /dev, or a node reused meanwhile
