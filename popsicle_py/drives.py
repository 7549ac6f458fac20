"""The layer that knows drives: discovery, the Drive value, eligibility and explicit targets.

Writing to the wrong drive is a flasher's worst failure, so every decision here is made by
device number (never by comparing path strings: /dev/sda must not match /dev/sdaa1) and from
sysfs, which is what the kernel says rather than what a name suggests.  Sizes come from sysfs
too: under umockdev a /dev node is a plain file, and a discovered drive must not need an open.

The decisions themselves (:func:`system_reason`, :func:`eligibility`, :func:`explain`) are plain
functions over plain data, so they are testable without any drive; the I/O lives at the edges
(:func:`gather_facts`, :func:`discover`, :func:`drive_for_path`, :func:`still_same`).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import psutil
import pyudev

SYSFS = "/sys"

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


class TargetError(Exception):
    """An explicitly named target that cannot be used; ``str()`` is one line for the user."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
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

    @property
    def label(self) -> str:
        """Vendor and model for display ("SanDisk Cruzer Blade"), or "" when unknown."""
        vendor, model = self.vendor.strip(), self.model.strip()
        if vendor and model.lower().startswith(vendor.lower()):
            vendor = ""
        return " ".join(part for part in (vendor, model) if part)

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
            data[key] = list(value) if isinstance(value, tuple) else value
        data["label"] = self.label
        data["major"] = self.major
        data["minor"] = self.minor
        return data


# --------------------------------------------------------------------------------------------
# Pure rules


@dataclass(frozen=True)
class Mount:
    """One mount, with every block device number it rests on (partition, disk, dm slaves...)."""

    device: str
    mountpoint: str
    devnums: frozenset[int]


@dataclass(frozen=True)
class Swap:
    """One active swap area (partition or file) and the block devices it rests on."""

    path: str
    devnums: frozenset[int]


@dataclass(frozen=True)
class SystemFacts:
    """What the running system is using, gathered once per decision."""

    mounts: tuple[Mount, ...] = ()
    swaps: tuple[Swap, ...] = ()
    #: Block devices the image file lives on (its filesystem's disk, loop backing chain...).
    image_devnums: frozenset[int] = frozenset()
    #: (st_dev, st_ino) of the image, to catch a loop device whose backing file is the image.
    image_inode: tuple[int, int] | None = None


def system_reason(devnum: int, facts: SystemFacts, backing_inode: tuple[int, int] | None = None
                  ) -> str | None:
    """Why the disk ``devnum`` is a system drive, or None.

    ``devnum`` is the whole disk's number; mounts and swaps already carry every device number
    they rest on (their partition's disk included), so this is set membership, never prefixes.
    """
    mounted = {m.mountpoint for m in facts.mounts if devnum in m.devnums}
    for mountpoint in SYSTEM_MOUNTS:
        if mountpoint in mounted:
            return f"system drive ({mountpoint} is mounted from it)"
    if any(devnum in s.devnums for s in facts.swaps):
        return REASON_SWAP
    if devnum in facts.image_devnums or (
        backing_inode is not None and backing_inode == facts.image_inode
    ):
        return REASON_IMAGE
    return None


def mountpoints_of(devnum: int, mounts: Iterable[Mount]) -> tuple[str, ...]:
    """Mountpoints resting on the disk ``devnum`` (any partition, or stacked above), in order."""
    seen: dict[str, None] = {}
    for m in mounts:
        if devnum in m.devnums:
            seen.setdefault(m.mountpoint, None)
    return tuple(seen)


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


def format_size(size: int) -> str:
    """Decimal units, as drives are sold: 2.0 GB, 512.0 MB, 300 B."""
    if size < 1000:
        return f"{size} B"
    value = float(size)
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if value < 1000 or unit == "PB":
            break
    return f"{value:.1f} {unit}"


def decode_udev(value: str) -> str:
    r"""Undo udev's ``\x20`` escapes in *_ENC properties."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


# --------------------------------------------------------------------------------------------
# sysfs and system facts (I/O)


def _sys_dev(devnum: int) -> str:
    return f"{SYSFS}/dev/block/{os.major(devnum)}:{os.minor(devnum)}"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


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

    A partition rests on its disk, a dm/md device on its ``slaves``, a loop device on the
    device holding its backing file.  Walking down this way is how a mount of /dev/dm-0 (LVM,
    LUKS) or of a loop device protects the physical disk.
    """
    seen: set[int] = set()
    todo = [devnum]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        base = _sys_dev(current)
        if not os.path.exists(base):
            continue
        real = os.path.realpath(base)
        if os.path.exists(os.path.join(real, "partition")):
            parent = _parse_devnum(_read(os.path.join(os.path.dirname(real), "dev")))
            if parent is not None:
                todo.append(parent)
        slaves = os.path.join(real, "slaves")
        if os.path.isdir(slaves):
            for name in os.listdir(slaves):
                slave = _parse_devnum(_read(os.path.join(slaves, name, "dev")))
                if slave is not None:
                    todo.append(slave)
        backing = _read(os.path.join(real, "loop", "backing_file"))
        if backing:
            todo.extend(_devnums_of_file(backing))
    return frozenset(seen)


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


def current_mounts() -> tuple[Mount, ...]:
    """Every mount backed by a block device, in mount-table order."""
    mounts: list[Mount] = []
    for part in psutil.disk_partitions(all=True):
        numbers: list[int] = []
        try:
            st = os.stat(part.device) if part.device.startswith("/") else None
        except OSError:
            st = None
        if st is not None and stat.S_ISBLK(st.st_mode):
            numbers.append(st.st_rdev)
        elif part.mountpoint in SYSTEM_MOUNTS:
            # "/dev/root" and friends: the mountpoint's own st_dev is the filesystem's device.
            try:
                dev = os.stat(part.mountpoint).st_dev
            except OSError:
                continue
            if os.path.exists(_sys_dev(dev)):
                numbers.append(dev)
        if not numbers:
            continue
        devnums = frozenset().union(*(stack_of(n) for n in numbers))
        mounts.append(Mount(part.device, part.mountpoint, devnums))
    return tuple(mounts)


def _unescape_proc(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def current_swaps() -> tuple[Swap, ...]:
    """Active swap areas from /proc/swaps, with the devices they rest on."""
    text = _read("/proc/swaps") or ""
    swaps: list[Swap] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if not fields:
            continue
        path = _unescape_proc(fields[0])
        numbers = _devnums_of_file(path)
        if numbers:
            swaps.append(Swap(path, frozenset().union(*(stack_of(n) for n in numbers))))
    return tuple(swaps)


def gather_facts(image_path: str | None = None) -> SystemFacts:
    """Read mounts, swaps and where the image lives: the inputs of :func:`system_reason`."""
    image_devnums: frozenset[int] = frozenset()
    image_inode: tuple[int, int] | None = None
    if image_path:
        numbers = _devnums_of_file(image_path)
        image_devnums = frozenset().union(*(stack_of(n) for n in numbers))
        try:
            st = os.stat(image_path)
            image_inode = (st.st_dev, st.st_ino)
        except OSError:
            pass
    return SystemFacts(current_mounts(), current_swaps(), image_devnums, image_inode)


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
        return props["ID_BUS"]
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


def _backing_inode(device: pyudev.Device) -> tuple[int, int] | None:
    backing = _read(os.path.join(device.sys_path, "loop", "backing_file"))
    if not backing:
        return None
    try:
        st = os.stat(backing)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


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
    swap = any(devnum in s.devnums for s in facts.swaps)
    system = system_reason(devnum, facts, _backing_inode(device) if bus == "loop" else None)
    eligible, reason = eligibility(bus=bus, size=size, read_only=read_only, system=system,
                                   explicit=explicit)
    vendor, model, serial = _identity(device)
    return Drive(
        path=path or _node(device),
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
    )


# --------------------------------------------------------------------------------------------
# Public entry points


def discover(context: pyudev.Context | None = None, *, include_all: bool = False,
             image_path: str | None = None, facts: SystemFacts | None = None) -> list[Drive]:
    """USB drives and SD cards (eligible or not), or with ``include_all`` every whole disk.

    Ineligible drives are listed too (an empty reader says "no medium") so the user sees why
    a drive they expected is not offered.  Sorted by path.
    """
    context = context or pyudev.Context()
    facts = facts or gather_facts(image_path)
    drives: list[Drive] = []
    for device in context.list_devices(subsystem="block", DEVTYPE="disk"):
        drive = build_drive(device, facts, explicit=False)
        if include_all or drive.bus in AUTO_BUSES:
            drives.append(drive)
    return sorted(drives, key=lambda d: d.path)


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


def still_same(drive: Drive, *, context: pyudev.Context | None = None) -> str | None:
    """None if ``drive.path`` is still the drive that was selected, else why not.

    A stick swapped in the same port between selection and writing gets the same path; its
    device number, size or serial differs.
    """
    changed = f"{drive.path} changed since it was selected ({{}}): was it swapped?"
    try:
        st = os.stat(drive.path)
    except FileNotFoundError:
        return f"{drive.path} is gone since it was selected: was it unplugged?"
    except OSError as e:
        return f"{drive.path} cannot be examined: {e.strerror}"
    if not stat.S_ISBLK(st.st_mode) or st.st_rdev != drive.devnum:
        return changed.format("different device number")
    sys_path = _sys_dev(drive.devnum)
    sectors = _read(os.path.join(sys_path, "size"))
    size = int(sectors) * 512 if sectors and sectors.isdigit() else 0
    if size != drive.size:
        return changed.format("different size")
    try:
        device = pyudev.Devices.from_sys_path(context or pyudev.Context(),
                                              os.path.realpath(sys_path))
    except pyudev.DeviceNotFoundError:
        return f"{drive.path} is gone since it was selected: was it unplugged?"
    if _identity(device)[2] != drive.serial:
        return changed.format("different serial")
    return None
