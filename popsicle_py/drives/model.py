"""The drive layer's plain values: the Drive, where its bytes are stored, and what the system uses.

Frozen dataclasses, no I/O: :mod:`.rules` decides over them, :mod:`.system` and :mod:`.udev`
fill them in from the running system.  Every decision is made by device number (never by
comparing path strings: /dev/sda must not match /dev/sdaa1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, field

from popsicle_py.errors import Refused

# Re-exported: callers find every drive value here.
from popsicle_py.identity import LoopKey as LoopKey
from popsicle_py.identity import MediaIdentity as MediaIdentity
from popsicle_py.records import record
from popsicle_py.units import format_size

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


@record
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
    #: Why it, or what backs it, is in use, one reason each: a loop device over a mounted
    #: device, a mount in another namespace, a loop device over it, a process with it open.
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


Inode = tuple[int, int]


@record
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
    #: Why what writing the disk overwrites is unknown ("backed by X, which does not
    #: answer"): a backing file not found by its name when the kernel cannot be asked, or on
    #: a hung mount.  A reason to refuse it.
    unknown: str | None = None

    @property
    def all_devnums(self) -> frozenset[int]:
        return self.devnums | self.under

    @property
    def all_files(self) -> frozenset[Inode]:
        return self.files | self.under_files


@record
class Process:
    """A running program, as messages name it: ``sleep (pid 1234)``."""

    pid: int
    program: str


@record
class Mount:
    """One mount, with every block device (and backing file) it rests on."""

    device: str
    mountpoint: str
    devnums: frozenset[int]
    files: frozenset[Inode] = frozenset()
    #: None for a mount of our own mount namespace; else a process of the namespace it is in
    #: (a container, a service with PrivateMounts), which ``--unmount`` cannot reach.
    namespace: Process | None = None
    #: The block devices it is mounted from (before walking down what they rest on).
    sources: frozenset[int] = frozenset()


@record
class Opener:
    """A process holding a block device open (``fuser``): which node, what its I/O reaches."""

    process: Process
    device: str  # the node it opened, as its descriptor names it
    devnum: int
    #: The opened device and every device its writes land on (a partition's disk, a loop
    #: device's backing device...).
    devnums: frozenset[int]
    writing: bool  # opened O_WRONLY or O_RDWR
    #: The files its writes land on (a loop device's backing file).
    files: frozenset[Inode] = frozenset()


@record
class LoopOver:
    """A loop device whose backing file is a block device (a "window" at some offset)."""

    device: str
    devnum: int
    offset: int
    #: Every device its writes land on: the backing device and what that rests on.
    devnums: frozenset[int]
    #: For a loop device over a file (:attr:`SystemFacts.file_loops`): that file's name,
    #: and the devices stacked on the loop device (dm, md), for messages.
    file: str | None = None
    holders: tuple[str, ...] = ()


@record
class Swap:
    """One active swap area (partition or file) and the block devices it rests on."""

    path: str
    devnums: frozenset[int]
    files: frozenset[Inode] = frozenset()


@record
class LoopAnswers:
    """What the kernel said each loop device stands on (LOOP_GET_STATUS64), asked once for
    a gathering, on one thread: ``keys`` of those that answered (None: not ours to ask),
    ``silent`` those that did not in time (a backing file on a hung mount)."""

    keys: Mapping[int, LoopKey | None] = field(default_factory=dict, compare=False)
    silent: frozenset[int] = frozenset()


@record
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
    #: Mounts in other mount namespaces (every process's mountinfo, one per namespace).
    foreign_mounts: tuple[Mount, ...] = ()
    #: Loop devices standing on block devices.
    loops: tuple[LoopOver, ...] = ()
    #: Loop devices over a file of a file system mounted here, with the devices holding
    #: that file: the file system cannot be unmounted while they use it.
    file_loops: tuple[LoopOver, ...] = ()
    #: Block devices other processes hold open (our own descriptors never count).
    openers: tuple[Opener, ...] = ()
    #: What every loop device stands on, as the kernel said when these facts were gathered.
    answers: LoopAnswers = field(default_factory=LoopAnswers, compare=False, repr=False)
    #: Of the drives asked about, whether an exclusive open was refused (EBUSY) just now.
    exclusive: Mapping[int, bool] = field(default_factory=dict, compare=False, repr=False)


@record
class Refusal:
    """One reason not to write a drive: a few words for a drive found by discovery
    (``watch``, ``--all-usb`` notes) and one line naming it for an explicit target."""

    kind: str  # "ineligible", "max-size", "too-small", "mounted", "held", "busy"
    reason: str
    line: str
