"""The layer that knows drives: discovery, the Drive value, eligibility and explicit targets.

Writing to the wrong drive is a flasher's worst failure, so every decision here is made by
device number (never by comparing path strings: /dev/sda must not match /dev/sdaa1) and from
sysfs, which is what the kernel says rather than what a name suggests.  Sizes come from sysfs
too: under umockdev a /dev node is a plain file, and a discovered drive must not need an open.

The decisions themselves (:func:`system_reason`, :func:`eligibility`, :func:`explain`) are plain
functions over plain data, so they are testable without any drive; the I/O lives at the edges
(:func:`gather_facts`, :func:`discover`, :func:`drive_for_path`, :func:`still_same`).

What a disk's bytes are stored on counts as much as the disk: a loop device is judged by what
backs it (a block device, recursively; a file, with every other loop device and mount using
that file), and the devices of a mounted multi-device btrfs, or the layers of an overlay, count
as that filesystem's.  :class:`Backing` is that walk's result; the rules compare sets.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import pyudev

from popsicle_py import blockdev, sysfs
from popsicle_py.errors import Refused

# Re-exported: callers find every drive rule here.
from popsicle_py.identity import LoopKey as LoopKey
from popsicle_py.identity import MediaIdentity as MediaIdentity
from popsicle_py.identity import not_confirmed
from popsicle_py.identity import same_media as same_media
from popsicle_py.units import format_size

#: Mountpoints that make the drive beneath them a system drive, in the order reasons name them.
SYSTEM_MOUNTS: tuple[str, ...] = (
    "/",
    "/boot",
    "/boot/efi",
    "/efi",
    "/usr",
    "/var",
    "/home",
    "/opt",
)

#: Buses discovery offers as targets.
AUTO_BUSES = frozenset({"usb", "sd"})

REASON_NO_MEDIUM = "no medium"
REASON_READ_ONLY = "read-only"
REASON_IMAGE = "holds the image"
REASON_SWAP = "active swap"
REASON_NOT_USB = "not a USB or SD drive"


class TargetError(Refused):
    """An explicitly named target that cannot be used; ``str()`` is one line for the user."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__([message])
        self.path = path
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Drive:
    """A whole disk as it was when selected: what to show, and whether it may be written."""

    path: str
    name: str
    devnum: int
    vendor: str
    model: str
    serial: str
    size: int
    logical_block_size: int
    bus: str
    removable: bool
    read_only: bool
    has_media: bool
    partitions: tuple[str, ...]
    mountpoints: tuple[str, ...]
    swap: bool
    eligible: bool
    reason: str | None
    system: bool
    #: Devices stacked on the disk or its partitions (dm, md): they keep it open.
    holders: tuple[str, ...] = ()
    #: The USB port it hangs off ("1-1.2": bus 1, port 1, hub port 2); None when not USB.
    port_path: str | None = None
    #: The kernel's media counter when the drive was selected (Linux >= 5.15); None if unknown.
    diskseq: int | None = None
    #: For a loop device: what it stood on when selected.
    loop: LoopKey | None = None
    #: Why what backs it is in use (a loop device over a mounted device...), one reason each.
    busy: tuple[str, ...] = ()
    #: Where its bytes are stored; not in :meth:`to_json` (sets of device numbers).
    backing: Backing | None = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        """Vendor and model for display ("SanDisk Cruzer Blade"), or "" when unknown."""
        vendor, model = self.vendor.strip(), self.model.strip()
        if vendor and model.lower().startswith(vendor.lower()):
            vendor = ""
        return " ".join(part for part in (vendor, model) if part)

    @property
    def identity(self) -> MediaIdentity:
        """The medium selected, to compare with what is there when writing starts."""
        return MediaIdentity(self.path, self.devnum, self.size, self.diskseq, self.serial,
                             self.loop, self.bus == "loop")

    @property
    def major(self) -> int:
        return os.major(self.devnum)

    @property
    def minor(self) -> int:
        return os.minor(self.devnum)

    def describe(self) -> str:
        """``/dev/sdc (SanDisk Extreme, 256.0 GB)``: how messages name a drive."""
        size = format_size(self.size) if self.size else ""
        inside = ", ".join(part for part in (self.label, size) if part)
        return f"{self.path} ({inside})" if inside else self.path

    def to_json(self) -> dict[str, object]:
        """Plain JSON-ready data (tuples become lists) for ``list --json`` and tests."""
        data: dict[str, object] = {}
        for key, value in asdict(self).items():
            if key != "backing":
                data[key] = list(value) if isinstance(value, tuple) else value
        data["label"] = self.label
        data["major"] = self.major
        data["minor"] = self.minor
        return data


# --------------------------------------------------------------------------------------------
# Pure rules


Inode = tuple[int, int]


@dataclass(frozen=True)
class Backing:
    """Where a disk's bytes are stored, from walking down sysfs (see :func:`backing_of`).

    ``devnums``/``files`` are what writing the disk overwrites: the disk, a loop device's
    backing block device (recursively), a partition's disk, dm slaves, and a loop device's
    backing file.  ``under``/``under_files`` add what those rest on without being written (the
    disk holding a backing file), which a user of the disk (a mount) depends on as well.
    """

    devnums: frozenset[int]
    files: frozenset[Inode] = frozenset()
    under: frozenset[int] = frozenset()
    under_files: frozenset[Inode] = frozenset()
    #: What backs a loop device, for messages: "/dev/loop1", "/dev/shm/disk.img".
    name: str | None = None

    @property
    def all_devnums(self) -> frozenset[int]:
        return self.devnums | self.under

    @property
    def all_files(self) -> frozenset[Inode]:
        return self.files | self.under_files


def overwrites(target: Backing, devnums: frozenset[int], files: frozenset[Inode]) -> bool:
    """Whether writing ``target`` overwrites storage that something resting on ``devnums``
    and ``files`` (a mount, a swap area, the image, another target) uses."""
    return bool(target.devnums & devnums or target.files & files)


@dataclass(frozen=True)
class Mount:
    """One mount, with every block device (and backing file) it rests on."""

    device: str
    mountpoint: str
    devnums: frozenset[int]
    files: frozenset[Inode] = frozenset()


@dataclass(frozen=True)
class Swap:
    """One active swap area (partition or file) and the block devices it rests on."""

    path: str
    devnums: frozenset[int]
    files: frozenset[Inode] = frozenset()


@dataclass(frozen=True)
class SystemFacts:
    """What the running system is using, gathered once per decision."""

    mounts: tuple[Mount, ...] = ()
    swaps: tuple[Swap, ...] = ()
    #: Block devices the image file lives on (its filesystem's disks, loop backing chain,
    #: btrfs devices, overlay layers...).
    image_devnums: frozenset[int] = frozenset()
    #: (st_dev, st_ino) of the image, to catch a loop device whose backing file is the image.
    image_inode: Inode | None = None
    #: Backing files the image's filesystem rests on (an image inside a loop-mounted file).
    image_files: frozenset[Inode] = frozenset()


def _as_backing(target: int | Backing, backing_inode: Inode | None = None) -> Backing:
    if isinstance(target, Backing):
        return target
    files = frozenset({backing_inode}) if backing_inode else frozenset()
    return Backing(frozenset({target}), files)


def system_reason(target: int | Backing, facts: SystemFacts,
                  backing_inode: Inode | None = None) -> str | None:
    """Why the disk (a device number, or its :class:`Backing`) is a system drive, or None.

    Mounts and swaps carry every device number they rest on (their partition's disk
    included), so this is set membership, never prefixes.  With a Backing, what the disk is
    stored on counts too: a loop device over the system disk is the system disk.
    """
    backing = _as_backing(target, backing_inode)
    mounted = {m.mountpoint for m in facts.mounts if overwrites(backing, m.devnums, m.files)}
    for mountpoint in SYSTEM_MOUNTS:
        if mountpoint in mounted:
            return f"system drive ({mountpoint} is mounted from it)"
    if any(overwrites(backing, s.devnums, s.files) for s in facts.swaps):
        return REASON_SWAP
    image_files = facts.image_files | ({facts.image_inode} if facts.image_inode else set())
    if overwrites(backing, facts.image_devnums, image_files):
        return REASON_IMAGE
    return None


def mountpoints_of(devnum: int, mounts: Iterable[Mount]) -> tuple[str, ...]:
    """Mountpoints resting on the disk ``devnum`` (any partition, or stacked above), in order."""
    seen: dict[str, None] = {}
    for m in mounts:
        if devnum in m.devnums:
            seen.setdefault(m.mountpoint, None)
    return tuple(seen)


def busy_reasons(devnum: int, backing: Backing, mounts: Iterable[Mount],
                 holders_beneath: Iterable[str] = ()) -> tuple[str, ...]:
    """Why what backs the disk ``devnum`` is in use, though the disk itself is not mounted.

    A loop device over a mounted device, or over a file that a mounted loop device also uses,
    writes under that filesystem: refused whatever ``--unmount`` says, since unmounting what
    lies beneath a target is not what the user asked for.
    """
    what = backing.name or "what backs it"
    found: dict[str, None] = {}
    for m in mounts:
        if devnum not in m.devnums and overwrites(backing, m.devnums, m.files):
            found.setdefault(f"backed by {what}, which is in use ({m.device} is mounted at "
                             f"{m.mountpoint})", None)
    for holder in holders_beneath:
        found.setdefault(f"backed by {what}, which is in use by {holder}", None)
    return tuple(found)


_LETTERED = re.compile(r"(sd|hd|vd|xvd)([a-z]+)(.*)")


def natural_key(path: str) -> tuple[str, tuple[str | int, ...]]:
    """Sort key in the kernel's own order: loop2 before loop10, sdz before sdaa."""
    head, name = os.path.split(path)
    match = _LETTERED.fullmatch(name)
    if match:
        number = 0
        for letter in match.group(2):  # bijective base 26: a=1 ... z=26, aa=27
            number = number * 26 + ord(letter) - ord("a") + 1
        name = f"{match.group(1)}{number}_{match.group(3)}"
    parts = re.split(r"(\d+)", name)
    return head, tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def kind_reason(bus: str, *, explicit: bool) -> str | None:
    """Why a disk of this kind is never a target; naming one explicitly allows more kinds."""
    if bus == "cd":
        return "optical drive"
    if bus in ("ram", "zram"):
        return "RAM disk"
    if bus == "dm":
        return "device-mapper volume (name the drive beneath it)"
    if bus == "md":
        return "software RAID array (name a drive, not the array)"
    if explicit or bus in AUTO_BUSES:
        return None
    if bus == "mmc":
        return "eMMC built-in storage, not a USB or SD drive"
    return REASON_NOT_USB


def eligibility(*, bus: str, size: int, read_only: bool, system: str | None,
                explicit: bool) -> tuple[bool, str | None]:
    """(eligible, reason): system protection first, then kind, medium and write protection."""
    reason = system or kind_reason(bus, explicit=explicit)
    if reason is None and size <= 0:
        reason = REASON_NO_MEDIUM
    if reason is None and read_only:
        reason = REASON_READ_ONLY
    return reason is None, reason


def explain(path: str, reason: str) -> str:
    """One line telling the user why ``path`` cannot be written."""
    if reason.startswith("system drive"):
        return f"{path} is a {reason}"
    if reason == REASON_NO_MEDIUM:
        return f"{path} has no medium (is a card inserted?)"
    if reason == REASON_READ_ONLY:
        return f"{path} is read-only (write-protected)"
    if reason == REASON_IMAGE:
        return f"{path} holds the image being written"
    if reason == REASON_SWAP:
        return f"{path} is a system drive (active swap)"
    return f"{path} cannot be written: {reason}"


@dataclass(frozen=True)
class Refusal:
    """One reason not to write a drive: a few words for a drive found by discovery
    (``watch``, ``--all-usb`` notes) and one line naming it for an explicit target."""

    kind: str  # "ineligible", "max-size", "too-small", "mounted", "held", "busy"
    reason: str
    line: str


def refusals(drive: Drive, *, image_size: int | None, unmount: bool = False,
             max_size: int | None = None, auto: bool = False) -> list[Refusal]:
    """Every reason not to write ``drive`` now, most fundamental first; empty when it may be.

    The one home of the rules ``flash`` (every line, to refuse the run) and ``watch`` (the
    first reason, to leave a stick alone) apply.  An ineligible drive gets its reason only: a
    system drive stays refused whatever the user asked (``unmount`` covers ordinary mounts of
    the drive itself, never what lies beneath it).  ``auto`` is for a drive nobody named
    (discovered): only USB and SD drives, at most ``max_size``.
    """
    path = drive.path
    if (auto and drive.bus not in AUTO_BUSES) or not drive.eligible:
        reason = drive.reason or (REASON_NOT_USB if drive.eligible else "not eligible")
        return [Refusal("ineligible", reason, explain(path, reason))]
    found: list[Refusal] = []
    if auto and max_size is not None and drive.size > max_size:
        reason = f"larger than {format_size(max_size)} (--max-size)"
        found.append(Refusal("max-size", reason, f"{path} is {reason}"))
    if image_size is not None and image_size > drive.size:
        image, size = _sizes(image_size, drive.size)
        found.append(Refusal(
            "too-small", f"smaller than the image ({size} drive, {image} image)",
            f"image is larger than {path}: {image} image, {size} drive"))
    if drive.mountpoints and not unmount:
        at = ", ".join(drive.mountpoints)
        found.append(Refusal("mounted", f"mounted at {at}",
                             f"{path} is mounted at {at}; use --unmount to unmount it"))
    if drive.holders:
        by = ", ".join(drive.holders)
        found.append(Refusal("held", f"in use by {by} (LVM, encryption or RAID)",
                             f"{path} is in use by {by} (LVM, encryption or RAID);"
                             " deactivate that first"))
    for reason in drive.busy:
        found.append(Refusal("busy", reason, f"{path} is {reason}"))
    return found


def _sizes(image_size: int, drive_size: int) -> tuple[str, str]:
    """Both sizes for the user; exact bytes too when rounding would make them look equal."""
    image, drive = format_size(image_size), format_size(drive_size)
    if image.replace(".0 ", " ") == drive.replace(".0 ", " "):  # 2.0 MiB and 2 MiB look alike
        image, drive = f"{image} ({image_size} bytes)", f"{drive} ({drive_size} bytes)"
    return image, drive


def decode_udev(value: str) -> str:
    r"""Undo udev's ``\x20`` escapes in *_ENC properties."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


# --------------------------------------------------------------------------------------------
# sysfs and system facts (I/O)


_sys_dev = sysfs.block_dir
_read = sysfs.read


def _parse_devnum(text: str | None) -> int | None:
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
            parent = _parse_devnum(_read(os.path.join(os.path.dirname(real), "dev")))
            if parent is not None:
                todo.append((parent, written))
        slaves = os.path.join(real, "slaves")
        if os.path.isdir(slaves):
            for slave_name in sorted(os.listdir(slaves)):
                slave = _parse_devnum(_read(os.path.join(slaves, slave_name, "dev")))
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
        devnum = _parse_devnum(fields[2])
        if devnum is None:
            continue
        entries.append(MountEntry(devnum, _unescape_mount(fields[4]), tail[0],
                                  _unescape_mount(tail[1]), tail[2] if len(tail) > 2 else ""))
    return entries


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
        members = {_parse_devnum(_read(os.path.join(directory, n, "dev")))
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


def current_mounts() -> tuple[Mount, ...]:
    """Every mount that rests on a block device or a file, in mount-table order.

    A btrfs filesystem rests on all its devices, an overlay on the devices of its layers;
    "/dev/root" and other unnamed roots are found by the filesystem's own device number.
    """
    mounts: list[Mount] = []
    for entry in mount_table():
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


def gather_facts(image_path: str | None = None) -> SystemFacts:
    """Read mounts, swaps and where the image lives: the inputs of :func:`system_reason`."""
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
    return SystemFacts(current_mounts(), current_swaps(), image_devnums, image_inode,
                       image_files)


# --------------------------------------------------------------------------------------------
# Building a Drive from a pyudev device


def _attr(device: pyudev.Device | None, name: str) -> str | None:
    if device is None:
        return None
    try:
        value = device.attributes.get(name)
    except (KeyError, OSError):
        return None
    if value is None:
        return None
    return value.decode(errors="replace").strip() if isinstance(value, bytes) else str(value)


def _prop(device: pyudev.Device, *names: str) -> str:
    """First non-empty udev property among ``names`` (``*_ENC`` ones decoded)."""
    for name in names:
        value = device.properties.get(name)
        if value:
            value = decode_udev(value) if name.endswith("_ENC") else value.replace("_", " ")
            if value.strip():
                return value.strip()
    return ""


def _parent(device: pyudev.Device, subsystem: str, devtype: str | None = None
            ) -> pyudev.Device | None:
    try:
        return device.find_parent(subsystem, devtype)
    except (KeyError, OSError):
        return None


def bus_of(device: pyudev.Device) -> str:
    """usb, sd, loop, cd, nvme, mmc (eMMC), ata, scsi, virtio, dm, md, ram, zram or unknown."""
    name = device.sys_name
    props = device.properties
    if name.startswith("sr") or props.get("ID_CDROM") == "1" or props.get("ID_TYPE") == "cd":
        return "cd"
    for prefix, bus in (("loop", "loop"), ("zram", "zram"), ("ram", "ram"), ("dm-", "dm"),
                        ("md", "md"), ("nvme", "nvme"), ("vd", "virtio"), ("xvd", "xen")):
        if name.startswith(prefix):
            return bus
    if name.startswith("mmcblk"):
        # SD cards and eMMC share the driver; the card's type tells them apart.
        return "sd" if _attr(_parent(device, "mmc"), "type") == "SD" else "mmc"
    if props.get("ID_BUS") == "usb" or _parent(device, "usb", "usb_device") is not None:
        return "usb"
    if props.get("ID_BUS"):
        return str(props["ID_BUS"])
    if "/ata" in device.sys_path:
        return "ata"
    if _parent(device, "scsi") is not None:
        return "scsi"
    return "unknown"


def _identity(device: pyudev.Device) -> tuple[str, str, str]:
    """(vendor, model, serial) from udev properties, falling back to sysfs without udev."""
    usb = _parent(device, "usb", "usb_device")
    scsi = _parent(device, "scsi", "scsi_device")
    mmc = _parent(device, "mmc")
    nvme = _parent(device, "nvme")
    scsi_vendor = _attr(scsi, "vendor")
    if scsi_vendor == "ATA":  # libata's placeholder, not a vendor
        scsi_vendor = None
    vendor = (_prop(device, "ID_VENDOR_ENC", "ID_VENDOR") or scsi_vendor
              or _attr(usb, "manufacturer") or "")
    model = (_prop(device, "ID_MODEL_ENC", "ID_MODEL", "ID_NAME") or _attr(scsi, "model")
             or _attr(nvme, "model") or _attr(mmc, "name") or _attr(usb, "product") or "")
    serial = (device.properties.get("ID_SERIAL_SHORT") or _attr(usb, "serial")
              or _attr(nvme, "serial") or _attr(mmc, "serial")
              or device.properties.get("ID_SERIAL") or "")
    return vendor.strip(), model.strip(), serial.strip()


def _partitions(device: pyudev.Device) -> list[pyudev.Device]:
    parts = [child for child in device.children
             if child.subsystem == "block" and child.device_type == "partition"]

    def number(part: pyudev.Device) -> int:
        try:
            return int(_attr(part, "partition") or 0)
        except ValueError:
            return 0

    return sorted(parts, key=number)


def _node(device: pyudev.Device) -> str:
    return device.device_node or f"/dev/{device.sys_name}"


def _holders(device: pyudev.Device, parts: list[pyudev.Device]) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for dev in (device, *parts):
        directory = os.path.join(dev.sys_path, "holders")
        if os.path.isdir(directory):
            for name in sorted(os.listdir(directory)):
                found.setdefault(f"/dev/{name}", None)
    return tuple(found)


def _holders_beneath(backing: Backing, devnum: int) -> tuple[str, ...]:
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
        return blockdev.loop_key_of_sysfs(devnum)
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode) and os.fstat(fd).st_rdev == devnum:
            key = blockdev.loop_key_of_fd(fd)
            if key is not None:
                return key
    finally:
        os.close(fd)
    return blockdev.loop_key_of_sysfs(devnum)


def port_path_of(device: pyudev.Device) -> str | None:
    """The USB port path ("1-1.2") of the usb_device above a disk, None when not on USB."""
    usb = _parent(device, "usb", "usb_device")
    return usb.sys_name if usb is not None else None


def devnum_of(device: pyudev.Device) -> int:
    """The device number from sysfs ``dev`` (works without udev and under umockdev)."""
    number = _parse_devnum(_attr(device, "dev"))
    return number if number is not None else device.device_number


def build_drive(device: pyudev.Device, facts: SystemFacts, *, explicit: bool,
                path: str | None = None) -> Drive:
    """A Drive for a whole-disk pyudev device, judged against ``facts``."""
    devnum = devnum_of(device)
    sectors = _attr(device, "size")
    size = int(sectors) * 512 if sectors and sectors.isdigit() else 0
    block = _attr(device, "queue/logical_block_size")
    logical_block_size = int(block) if block and block.isdigit() and int(block) > 0 else 512
    bus = bus_of(device)
    read_only = _attr(device, "ro") == "1"
    parts = _partitions(device)
    backing = backing_of(devnum)
    swap = any(overwrites(backing, s.devnums, s.files) for s in facts.swaps)
    system = system_reason(backing, facts)
    node = path or _node(device)
    diskseq = _attr(device, "diskseq")
    eligible, reason = eligibility(bus=bus, size=size, read_only=read_only, system=system,
                                   explicit=explicit)
    vendor, model, serial = _identity(device)
    return Drive(
        path=node,
        name=device.sys_name,
        devnum=devnum,
        vendor=vendor,
        model=model,
        serial=serial,
        size=size,
        logical_block_size=logical_block_size,
        bus=bus,
        removable=_attr(device, "removable") == "1",
        read_only=read_only,
        has_media=size > 0,
        partitions=tuple(_node(p) for p in parts),
        mountpoints=mountpoints_of(devnum, facts.mounts),
        swap=swap,
        eligible=eligible,
        reason=reason,
        system=system is not None,
        holders=_holders(device, parts),
        port_path=port_path_of(device),
        diskseq=int(diskseq) if diskseq and diskseq.isdigit() else None,
        loop=loop_key(node, devnum) if bus == "loop" else None,
        busy=busy_reasons(devnum, backing, facts.mounts, _holders_beneath(backing, devnum)),
        backing=backing,
    )


# --------------------------------------------------------------------------------------------
# Public entry points


def discover(context: pyudev.Context | None = None, *, include_all: bool = False,
             image_path: str | None = None, facts: SystemFacts | None = None) -> list[Drive]:
    """USB drives and SD cards (eligible or not), or with ``include_all`` every whole disk.

    Ineligible drives are listed too (an empty reader says "no medium") so the user sees why
    a drive they expected is not offered; loop devices attached to nothing are not (they are
    free slots, not disks).  Sorted as the kernel numbers them (loop2 before loop10).
    """
    context = context or pyudev.Context()
    facts = facts or gather_facts(image_path)
    drives: list[Drive] = []
    for device in context.list_devices(subsystem="block", DEVTYPE="disk"):
        if device.sys_name.startswith("loop") and _attr(device, "size") in ("0", None) \
                and not _attr(device, "loop/backing_file"):
            continue
        drive = build_drive(device, facts, explicit=False)
        if include_all or drive.bus in AUTO_BUSES:
            drives.append(drive)
    return sorted(drives, key=lambda d: natural_key(d.path))


def _kind_of_file(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a device"


def drive_for_path(path: str, *, image_path: str | None = None,
                   context: pyudev.Context | None = None,
                   facts: SystemFacts | None = None) -> Drive:
    """The Drive for an explicitly named target, or TargetError with one line saying why not.

    Raises for what can never be a target (missing, not a block device, a partition, a system
    drive); returns an ineligible Drive for the rest (read-only, no medium...), so callers can
    report every refusal together.  Loop devices and other non-USB disks are allowed here:
    naming a drive is a deliberate act.
    """
    shown = path
    if not os.path.lexists(path):
        raise TargetError(path, f"{path} does not exist")
    real = os.path.realpath(path)
    if real != path:
        shown = f"{path} ({real})"
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise TargetError(path, f"{shown} does not exist") from None
    except OSError as e:
        raise TargetError(path, f"{shown} cannot be examined: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise TargetError(path, f"{shown} is not a block device ({_kind_of_file(st.st_mode)})")
    sys_path = _sys_dev(st.st_rdev)
    if not os.path.exists(sys_path):
        raise TargetError(path, f"{shown} is a block device the kernel does not list in sysfs")
    context = context or pyudev.Context()
    try:
        # The resolved path, as libudev would resolve it; under umockdev only the resolved
        # one is the testbed's when the host has a device of the same number.
        device = pyudev.Devices.from_sys_path(context, os.path.realpath(sys_path))
    except pyudev.DeviceNotFoundError:
        raise TargetError(path, f"{shown} is a block device udev cannot find") from None
    is_partition = device.device_type == "partition" or _attr(device, "partition") is not None
    if is_partition:
        disk = device.find_parent("block", "disk")
        hint = f"; did you mean {_node(disk)}?" if disk is not None else ""
        raise TargetError(path, f"{shown} is a partition{hint}")
    if device.device_type not in (None, "disk"):
        raise TargetError(path, f"{shown} is not a whole disk ({device.device_type})")
    drive = build_drive(device, facts or gather_facts(image_path), explicit=True, path=real)
    if drive.system and drive.reason:
        raise TargetError(path, explain(shown, drive.reason))
    return drive


def media_identity(path: str, *, context: pyudev.Context | None = None) -> MediaIdentity:
    """The medium behind ``path`` now, from sysfs (and udev for the serial); OSError if gone.

    What :attr:`Drive.identity` recorded when the plan was made is compared with this before
    opening, and with :func:`popsicle_py.blockdev.identity_of_fd` after.
    """
    st = os.stat(path)
    devnum = st.st_rdev if stat.S_ISBLK(st.st_mode) else 0
    sys_path = _sys_dev(devnum)
    sectors = _read(os.path.join(sys_path, "size"))
    seq = _read(os.path.join(sys_path, "diskseq"))
    serial: str | None = None
    is_loop = False
    if devnum and os.path.exists(sys_path):
        try:
            device = pyudev.Devices.from_sys_path(context or pyudev.Context(), sys_path)
        except pyudev.DeviceNotFoundError:
            device = None
        if device is not None:
            serial = _identity(device)[2]
            is_loop = bus_of(device) == "loop"
    return MediaIdentity(
        path, devnum, int(sectors) * 512 if sectors and sectors.isdigit() else 0,
        int(seq) if seq and seq.isdigit() else None, serial,
        loop_key(path, devnum) if is_loop else None, is_loop)


def still_same(drive: Drive, *, context: pyudev.Context | None = None) -> str | None:
    """None if ``drive.path`` still holds the medium that was selected, else why not.

    A stick swapped in the same port between selection and writing gets the same path and
    perhaps the same size and serial; a loop device re-attached to another file the same path,
    number and size.  The media identity (diskseq, loop backing) tells them apart.
    """
    try:
        now = media_identity(drive.path, context=context)
    except FileNotFoundError:
        return f"{drive.path} is gone since it was selected: was it unplugged?"
    except OSError as e:
        return f"{drive.path} cannot be examined: {e.strerror}"
    if now.devnum == drive.devnum and not os.path.exists(_sys_dev(drive.devnum)):
        return f"{drive.path} is gone since it was selected: was it unplugged?"
    why = same_media(drive.identity, now)
    return not_confirmed(drive.path, why) if why else None


NO_UDEV_NOTE = ("no udev daemon is running (no /run/udev/control), so no plugged-in drive "
                "will be seen; start systemd-udevd, or name the drives to `flash`")


def udev_note(*, control_exists: bool, testbed: bool) -> str | None:
    """What to tell a ``watch`` user when hotplug events cannot arrive, or None.

    Drives arrive as events that the udev daemon re-broadcasts (a umockdev testbed sends its
    own); without either, ``watch`` would wait forever without a word.
    """
    return None if control_exists or testbed else NO_UDEV_NOTE


def udev_hint(run_dir: str = "/run/udev") -> str | None:
    """:func:`udev_note` for this machine: udevd's control socket, or a umockdev testbed."""
    return udev_note(control_exists=os.path.exists(os.path.join(run_dir, "control")),
                     testbed=bool(os.environ.get("UMOCKDEV_DIR")))

