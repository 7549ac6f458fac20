"""Holders, read from /proc and sysfs: what other mount namespaces mount, loop devices over
disks, which processes hold a disk open; and :func:`gather_facts`, everything the rules judge.

Apart from :mod:`.system` (mounts, swaps, what a disk is stored on), which these build on.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time

from popsicle_py import sysfs
from popsicle_py.drives.model import (
    Backing,
    Inode,
    LoopAnswers,
    LoopOver,
    Mount,
    Opener,
    Process,
    SystemFacts,
)
from popsicle_py.drives.opened import ExclusiveOpens, held, pids
from popsicle_py.drives.system import (
    DeviceNames,
    MountEntry,
    ask_loops,
    backing_of,
    btrfs_group,
    current_mounts,
    current_swaps,
    holder_path,
    mount_table,
    named_device,
    parse_devnum,
    path_storage,
    source_stats,
    unescape_mount,
)

_read = sysfs.read
_sys_dev = sysfs.block_dir


def gather_facts(image_path: str | None = None,
                 of: frozenset[int] | None = None) -> SystemFacts:
    """Mounts, swaps, where the image lives, holders (of ``of``: :func:`openers`); the
    kernel asked once what every loop device stands on; whether the kernel refuses an
    exclusive open of each of ``of`` (tried last, on a thread of their own: meanwhile, it
    would wait for the interpreter's lock while the rest is read)."""
    answers = ask_loops()
    image_devnums: frozenset[int] = frozenset()
    image_files: frozenset[Inode] = frozenset()
    image_inode: Inode | None = None
    if image_path:
        image_devnums, image_files = path_storage(image_path, answers)
        try:
            st = os.stat(image_path)
            image_inode = (st.st_dev, st.st_ino)
        except OSError:
            pass
    own = mount_table()
    mounts = current_mounts(own, answers)
    return SystemFacts(mounts, current_swaps(answers), image_devnums,
                       image_inode, image_files, foreign_mounts(own, answers),
                       loops_over_devices(answers), loops_over_files(own, answers),
                       openers(of, answers), answers, ExclusiveOpens(of or ()).refused())


# -- Holders: what other namespaces mount, loop devices over disks, who has a disk open -----


def _program(pid: int) -> str:
    return _read(f"/proc/{pid}/comm") or "?"


class _Backings:
    """:func:`backing_of` once per device for one gathering (many mounts share a device)."""

    def __init__(self, answers: LoopAnswers | None) -> None:
        self.known: dict[int, Backing] = {}
        self.answers = answers

    def __call__(self, devnum: int) -> Backing:
        if devnum not in self.known:
            self.known[devnum] = backing_of(devnum, self.answers)
        return self.known[devnum]


def _namespace_devnums(entry: MountEntry, pid: int,
                       stats: dict[str, os.stat_result | None]) -> set[int]:
    """Block devices a mount of another namespace stores its data on; its source is a path
    in that namespace, so it is looked up through the process's root (``stats``)."""
    numbers: set[int] = set()
    if os.path.exists(_sys_dev(entry.devnum)):
        numbers.add(entry.devnum)
    st = stats.get(f"/proc/{pid}/root{entry.source}")
    if st is not None and stat.S_ISBLK(st.st_mode):
        numbers.add(st.st_rdev)
    if entry.fstype == "btrfs" and numbers:
        numbers |= btrfs_group(numbers)
    return numbers


def foreign_mounts(own: list[MountEntry] | None = None, answers: LoopAnswers | None = None
                   ) -> tuple[Mount, ...]:
    """Mounts resting on block devices in every other mount namespace, one process each.

    A mount made inside ``unshare -m`` (a container, a service with PrivateMounts) is in no
    table of ours.  A copy that our unmount removes too is left out: ``--unmount`` covers it
    (see :func:`_follows`).  Without root, another user's ns/mnt link cannot be read but its
    mountinfo can: that namespace is told apart by the mount ids in its table (see
    :func:`_known_table`).
    """
    try:
        ours = os.readlink("/proc/self/ns/mnt")
    except OSError:
        return ()
    own = mount_table() if own is None else own
    groups = _unmount_groups(own)
    seen = {ours}
    tables = [frozenset(e.mount_id for e in own)]
    backing = _Backings(answers)
    found: list[Mount] = []
    for pid in pids():
        try:
            namespace: str | None = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            namespace = None
        if namespace in seen:
            continue
        text = _read(f"/proc/{pid}/mountinfo")
        if not text:
            continue
        ids = _mount_ids(text)
        if namespace is None and _known_table(ids, tables):
            continue
        if namespace is not None:
            seen.add(namespace)
        tables.append(ids)
        process = Process(pid, _program(pid))
        table = mount_table(text)
        parents = {e.mount_id: e for e in table}
        table = [e for e in table if not _follows(e, parents.get(e.parent_id), groups)]
        stats = source_stats(f"/proc/{pid}/root{e.source}" for e in table
                             if e.source.startswith("/dev/"))  # a node there: may hang
        for entry in table:
            numbers = _namespace_devnums(entry, pid, stats)
            if not numbers:
                continue
            devnums = frozenset().union(*(backing(n).all_devnums for n in numbers))
            files = frozenset().union(*(backing(n).all_files for n in numbers))
            found.append(Mount(entry.source, entry.mountpoint, devnums, files,
                               namespace=process, sources=frozenset(numbers)))
    return tuple(found)


def _mount_ids(text: str) -> frozenset[int]:
    """The mount ids of a mountinfo (its lines' first field)."""
    ids = set()
    for line in text.splitlines():
        first = line.partition(" ")[0]
        if first.isdigit():
            ids.add(int(first))
    return frozenset(ids)


def _known_table(ids: frozenset[int], tables: list[frozenset[int]]) -> bool:
    """Whether a mountinfo is of a namespace already seen: a mount id is the system's, never
    shared by two namespaces (a namespace's copy of a mount gets an id of its own), so one id
    in common is the same namespace, whatever mounts came or went between the two reads."""
    return any(ids & known for known in tables)


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


def loops_over_devices(answers: LoopAnswers | None = None) -> tuple[LoopOver, ...]:
    """Loop devices whose backing file is a block device, at whatever offset.

    The kernel says what each one stands on (:func:`~.system.loop_status`): a device node
    made in a container, under a name no kernel device has, is the device it stands for.
    """
    device_like = DeviceNames()
    answers = answers or ask_loops()
    backing = _Backings(answers)
    loops: dict[int, tuple[str, str]] = {}
    for name in sorted(n for n in device_like.names if n.startswith("loop")):
        base = f"{sysfs.ROOT}/class/block/{name}"
        source = _read(f"{base}/loop/backing_file")
        devnum = parse_devnum(_read(f"{base}/dev"))
        if source and devnum is not None:
            loops[devnum] = (name, source)
    found: list[LoopOver] = []
    for devnum, (name, source) in loops.items():
        if devnum in answers.keys:
            key = answers.keys[devnum]
        else:  # no answer: its backing file hangs, unless it names a device
            key = named_device(source, devnum, device_like)
        rdev = key.rdev if key is not None else 0  # 0: a file, or nothing to be known
        if not rdev:
            continue
        offset = _read(f"{sysfs.ROOT}/class/block/{name}/loop/offset") or "0"
        found.append(LoopOver(f"/dev/{name}", devnum, int(offset) if offset.isdigit() else 0,
                              backing(rdev).devnums))
    return tuple(found)


def loops_over_files(own: list[MountEntry] | None = None, answers: LoopAnswers | None = None
                     ) -> tuple[LoopOver, ...]:
    """Loop devices over a file of a file system mounted here, each with the devices that
    file rests on (a dm mapping stacked on such a loop device holds it as well).

    The file system cannot be unmounted while one uses a file on it (``--unmount`` fails
    "target is busy"), so the drive beneath is held, not merely mounted: ``list`` said
    "yes" for it, and ``flash`` told the user to use ``--unmount``, which then failed.  One
    on a file system mounted nowhere (``umount -l``) is for
    :func:`~.udev.held_by_kernel`.
    """
    answers = answers or ask_loops()
    backing = _Backings(answers)
    mounted = {entry.devnum for entry in (mount_table() if own is None else own)}
    rests_on: dict[int, frozenset[int]] = {}
    found: list[LoopOver] = []
    for devnum, key in sorted(answers.keys.items()):
        if key is None or key.rdev or key.dev not in mounted:
            continue
        # What the file's file system rests on, walked once for all the loop devices over
        # files of it (32 targets over files in one directory: one walk, not 32).
        on = rests_on.get(key.dev)
        if on is None:
            on = rests_on[key.dev] = backing(devnum).under
        if not on:
            continue  # a file of tmpfs, FUSE: on no drive
        real = os.path.realpath(_sys_dev(devnum))
        try:
            above = tuple(holder_path(name) for name in sorted(os.listdir(f"{real}/holders")))
        except OSError:
            above = ()
        found.append(LoopOver(f"/dev/{os.path.basename(real)}", devnum, 0, on,
                              _read(f"{real}/loop/backing_file"), above))
    return tuple(found)


#: Seconds between the two looks at the open descriptors (see :func:`openers`).
SETTLE = 0.1


def openers(of: frozenset[int] | None = None, answers: LoopAnswers | None = None
            ) -> tuple[Opener, ...]:
    """Block devices other processes hold, as ``fuser`` finds them: open (/proc/PID/fd,
    through whatever node), or mapped (/proc/PID/maps, its descriptor perhaps closed); and,
    with ``answers``, loop devices' backing files they hold open for writing (a virtual
    machine using the file as its disk).

    With or without O_EXCL (``dd`` reading it, ``sleep 60 < /dev/sdb``); ours do not count.
    Looked at twice, SETTLE apart, when one of ``of`` (None: any device) is held: a process
    that had it open for a moment only (``losetup``, a udev worker) holds nothing, and refusing
    it would fail runs at random; other devices' openers refuse nothing of ``of`` (no wait).
    """
    first = _scan_openers(answers)
    of_files = _backing_files(answers, of)
    if not any(of is None or o.devnums & of or o.files & of_files for o in first):
        return first
    time.sleep(SETTLE)
    seen = {(o.process.pid, o.devnum, o.files) for o in first}
    return tuple(o for o in _scan_openers(answers)
                 if (o.process.pid, o.devnum, o.files) in seen)


def _backing_files(answers: LoopAnswers | None, of: frozenset[int] | None
                   ) -> frozenset[Inode]:
    """The files loop devices (of ``of``; None: all) stand on, as the kernel said."""
    if answers is None:
        return frozenset()
    return frozenset((key.dev, key.ino) for devnum, key in answers.keys.items()
                     if key is not None and not key.rdev and (of is None or devnum in of))


def _scan_openers(answers: LoopAnswers | None) -> tuple[Opener, ...]:
    backing = _Backings(answers)
    programs: dict[int, str] = {}
    found: list[Opener] = []
    for one in held(_backing_files(answers, None)):
        process = Process(one.pid, programs.get(one.pid) or _program(one.pid))
        programs[one.pid] = process.program
        if stat.S_ISBLK(one.mode):
            stored = backing(one.rdev)
            found.append(Opener(process, one.name, one.rdev, stored.devnums, one.writing,
                                stored.files))
        else:  # a loop device's backing file, written: its drive's bytes
            found.append(Opener(process, one.name, 0, frozenset(), True,
                                frozenset({one.inode})))
    return tuple(found)


#: Seconds ``nsenter`` is given to read the table of a mount namespace kept by a file.
ASK_KEPT = 2.0


def kept_namespace_mounts(on: frozenset[int]) -> tuple[str, ...]:
    """Mounts of ``on`` (a disk and its partitions) in mount namespaces that no process is
    in, kept by a bind mount of their nsfs file (``unshare --mount=FILE``): no process's
    table lists them (:func:`foreign_mounts`), yet they hold the disk.  Each such table is
    read with ``nsenter``, given :data:`ASK_KEPT` seconds."""
    found: dict[str, None] = {}
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[3].startswith("mnt:[") or " - nsfs " not in line:
            continue
        keeper = unescape_mount(fields[4])
        try:
            table = subprocess.run(["nsenter", f"--mount={keeper}", "cat",
                                    "/proc/self/mountinfo"], capture_output=True, text=True,
                                   stdin=subprocess.DEVNULL, timeout=ASK_KEPT, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        for entry in mount_table(table.stdout):
            if entry.devnum in on:
                found.setdefault(f"mounted at {entry.mountpoint} in the mount namespace kept by"
                                 f" {keeper}, which no process is in: unmount it there, or "
                                 f"let that namespace go (umount {keeper})", None)
    return tuple(found)
