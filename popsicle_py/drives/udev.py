"""Drives as udev sees them: discovery, explicit targets, and the check before writing.

Sizes and numbers come from sysfs, which is what the kernel says rather than what a name
suggests: under umockdev a /dev node is a plain file, and a discovered drive must not need an
open.  These are the drive layer's I/O edges (:func:`discover`, :func:`drive_for_path`,
:func:`still_same`); they build :class:`~.model.Drive` values and judge them with
:mod:`.rules` against :mod:`.system`'s facts.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable

import pyudev

from popsicle_py import sysfs
from popsicle_py.drives.holders import (
    foreign_mounts,
    gather_facts,
    kept_namespace_mounts,
    loops_over_devices,
    loops_over_files,
    openers,
)
from popsicle_py.drives.model import (
    Backing,
    Drive,
    LoopKey,
    MediaIdentity,
    Mount,
    SystemFacts,
    TargetError,
)
from popsicle_py.drives.names import named_devnums, resolve_name
from popsicle_py.drives.opened import ExclusiveOpens
from popsicle_py.drives.rules import (
    AUTO_BUSES,
    busy_for_reading,
    busy_reasons,
    eligibility,
    explain,
    holder_reasons,
    mountpoints_of,
    natural_key,
    overwrites,
    system_reason,
)
from popsicle_py.drives.system import (
    ask_loops,
    backing_of,
    current_mounts,
    current_swaps,
    holder_named,
    holders_beneath,
    loop_key,
    mount_table,
    parse_devnum,
    source_stats,
    stacked_on,
    unescape_mount,
)
from popsicle_py.identity import not_confirmed, same_media
from popsicle_py.records import record

_sys_dev = sysfs.block_dir
_read = sysfs.read
_local = threading.local()


def udev_context() -> pyudev.Context:
    """This thread's libudev context, made once: pyudev loads libudev for each new one by
    running ``ldconfig -p`` (a process, several ms), which per drive and per check added up
    to a third of a second before the first write with 32 drives."""
    context: pyudev.Context | None = getattr(_local, "context", None)
    if context is None:
        context = _local.context = pyudev.Context()
    return context

def decode_udev(value: str) -> str:
    r"""Undo udev's ``\x20`` escapes in *_ENC properties."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


#: What says that this process, not the drive, could not read sysfs just now.
_OUT_OF = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


class SysfsUnreadable(OSError):
    """A drive's sysfs attributes could not be read now (out of descriptors or memory): no
    fact about the drive, least of all "no medium"."""


def _attr(device: pyudev.Device | None, name: str) -> str | None:
    """The attribute's text; None when the device has none.  SysfsUnreadable when it could
    not be read for want of descriptors or memory (libudev says so in errno only)."""
    if device is None:
        return None
    try:
        value = device.attributes.get(name)
    except OSError as exc:
        if exc.errno in _OUT_OF:
            raise SysfsUnreadable(exc.errno, exc.strerror) from None
        return None
    except KeyError:
        return None
    if value is None:
        number = ctypes.get_errno()  # pyudev's libudev is loaded with use_errno
        if number in _OUT_OF:
            raise SysfsUnreadable(number, os.strerror(number))
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
    """The disk's partitions: the directories of its own in sysfs that have a ``partition``
    file, as the kernel lays them out (pyudev's ``children`` enumerates every block device
    for each disk: quadratic with 32 sticks of 2 partitions, issue 30)."""
    parts = []
    try:
        names = sorted(os.listdir(device.sys_path))
    except OSError:
        names = []
    for name in names:
        path = os.path.join(device.sys_path, name)
        if not os.path.exists(os.path.join(path, "partition")):
            continue
        try:
            parts.append(pyudev.Devices.from_sys_path(device.context, path))
        except pyudev.DeviceNotFoundError:
            continue  # removed since the listing

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
                found.setdefault(holder_named(name), None)
    return tuple(found)


def port_path_of(device: pyudev.Device) -> str | None:
    """The USB port path ("1-1.2") of the usb_device above a disk, None when not on USB."""
    usb = _parent(device, "usb", "usb_device")
    return usb.sys_name if usb is not None else None


def devnum_of(device: pyudev.Device) -> int:
    """The device number from sysfs ``dev`` (works without udev and under umockdev)."""
    number = parse_devnum(_attr(device, "dev"))
    return number if number is not None else device.device_number


def _loop_identity(node: str, devnum: int, facts: SystemFacts, backing: Backing
                   ) -> LoopKey | None:
    """What the loop device stands on, for its identity: the kernel's answer when the facts
    were gathered (not asked again per drive); asked now only for a loop device bound since,
    never for one that did not answer (refused anyway: its backing does not answer)."""
    if devnum in facts.answers.keys:
        return facts.answers.keys[devnum]
    if devnum in facts.answers.silent or backing.unknown:
        return None
    return loop_key(node, devnum)


def build_drive(device: pyudev.Device, facts: SystemFacts, *, explicit: bool,
                path: str | None = None) -> Drive:
    """A Drive for a whole-disk pyudev device, judged against ``facts``; refused, saying
    why, when its attributes cannot be read now (a size read as 0 would say "no medium")."""
    try:
        return _build_drive(device, facts, explicit=explicit, path=path)
    except OSError as exc:  # SysfsUnreadable, or a directory of sysfs not listed
        if exc.errno not in _OUT_OF:
            raise
        return _unreadable(device, path, exc)


def _unreadable(device: pyudev.Device, path: str | None, exc: OSError) -> Drive:
    port = None
    with contextlib.suppress(OSError):
        port = port_path_of(device)
    return Drive(path=path or _node(device), name=device.sys_name,
                 devnum=device.device_number, vendor="", model="", serial="", size=0,
                 logical_block_size=512, bus="unknown", removable=False, read_only=False,
                 has_media=False, partitions=(), mountpoints=(), swap=False, eligible=False,
                 reason=f"its attributes could not be read ({exc.strerror}); plug it in "
                        "again", system=False, port_path=port)


def _build_drive(device: pyudev.Device, facts: SystemFacts, *, explicit: bool,
                 path: str | None) -> Drive:
    devnum = devnum_of(device)
    sectors = _attr(device, "size")
    size = int(sectors) * 512 if sectors and sectors.isdigit() else 0
    block = _attr(device, "queue/logical_block_size")
    logical_block_size = int(block) if block and block.isdigit() and int(block) > 0 else 512
    bus = bus_of(device)
    read_only = _attr(device, "ro") == "1"
    parts = _partitions(device)
    backing = backing_of(devnum, facts.answers)
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
        loop=_loop_identity(node, devnum, facts, backing) if bus == "loop" else None,
        busy=(busy_reasons(devnum, backing, facts.mounts, holders_beneath(backing, devnum))
              + holder_reasons(devnum, facts, backing)),
        backing=backing,
    )


def discover(context: pyudev.Context | None = None, *, include_all: bool = False,
             image_path: str | None = None, facts: SystemFacts | None = None) -> list[Drive]:
    """USB drives and SD cards (eligible or not), or with ``include_all`` every whole disk.

    Ineligible drives are listed too (an empty reader says "no medium") so the user sees why
    a drive they expected is not offered; loop devices attached to nothing are not (they are
    free slots, not disks).  Sorted as the kernel numbers them (loop2 before loop10).
    """
    context = context or udev_context()
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


def drive_for_path(path: str, *, image_path: str | None = None,
                   context: pyudev.Context | None = None,
                   facts: SystemFacts | None = None) -> Drive:
    """The Drive for an explicitly named target, or TargetError with one line saying why not.

    Raises for what can never be a target (missing, not a block device, a partition, a system
    drive); returns an ineligible Drive for the rest (read-only, no medium...), so callers can
    report every refusal together.  Loop devices and other non-USB disks are allowed here:
    naming a drive is a deliberate act.
    """
    real, shown, st = resolve_name(path)
    sys_path = _sys_dev(st.st_rdev)
    context = context or udev_context()
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
    facts = facts or gather_facts(image_path)
    drive = build_drive(device, facts, explicit=True, path=real)
    if drive.system and drive.reason:
        raise TargetError(path, explain(shown, drive.reason))
    return with_kernel_hold(drive, facts)


def build_discovered(device: pyudev.Device, facts: SystemFacts) -> Drive:
    """A drive nobody named (``watch``), judged as ``list`` judges it: busy with what the
    kernel holds unseen too (a stick whose file system was unmounted with ``umount -l``
    was announced eligible, then failed "the drive is busy")."""
    return with_kernel_hold(build_drive(device, facts, explicit=False), facts)


def with_kernel_hold(drive: Drive, facts: SystemFacts) -> Drive:
    """``drive``, busy with what the kernel holds of it that nothing we see explains (see
    :func:`held_by_kernel`), when it is otherwise free to be written."""
    if drive.eligible and not (drive.holders or drive.busy):
        kernel = (held_beside_mounts(drive, facts) if drive.mountpoints
                  else held_by_kernel(drive, facts))
        if kernel is not None:
            return dataclasses.replace(drive, busy=(kernel,))
    return drive


def held_by_kernel(drive: Drive, facts: SystemFacts) -> str | None:
    """Why the kernel holds ``drive`` exclusively though nothing we see explains it, or None.

    A file system unmounted with ``umount -l`` while in use (a loop device over a file on
    it, a file still open) is in no mount table and no process has the drive open, yet the
    exclusive open that writing starts with would fail, after the confirmation.  Found by a
    test of one (:class:`~.opened.ExclusiveOpens`, done by :func:`gather_facts` for the
    drives named; here for another)."""
    refused = facts.exclusive.get(drive.devnum)
    if refused is None:
        refused = ExclusiveOpens([drive.devnum]).refused()[drive.devnum]
    if not refused:
        return None
    return _why_held(frozenset({drive.devnum} | named_devnums(drive.partitions)), facts)


def held_beside_mounts(drive: Drive, facts: SystemFacts) -> str | None:
    """:func:`held_by_kernel` for a mounted drive: its own mount refuses the whole disk's
    exclusive open, so each partition mounted nowhere is tried instead.  ``--unmount``
    unmounted the rest, and then the open was refused; now nothing is unmounted."""
    mounted = {devnum for mount in facts.mounts for devnum in mount.devnums}
    free = named_devnums(drive.partitions) - mounted
    refused = frozenset(devnum for devnum, busy in ExclusiveOpens(free).refused().items()
                        if busy)
    return _why_held(refused, facts) if refused else None


def _why_held(on: frozenset[int], facts: SystemFacts) -> str:
    """What may hold ``on`` (a disk and its partitions), which the kernel refused to open
    exclusively though nothing we see explains it."""
    kept = kept_namespace_mounts(frozenset(on))
    if kept:
        return "; ".join(kept)
    loops = sorted((f"/dev/{os.path.basename(os.path.realpath(_sys_dev(devnum)))}"
                    for devnum, key in facts.answers.keys.items()
                    if key is not None and not key.rdev and key.dev in on),
                   key=natural_key)
    if loops:
        what = ("a loop device over a file on it" if len(loops) == 1
                else "loop devices over files on it")
        return (f"in use by {', '.join(loops)}, {what} (its file system is mounted nowhere:"
                " unmounted with `umount -l` while in use?)")
    swaps = [s.split()[0] for s in (_read("/proc/swaps") or "").splitlines()[1:] if s.split()]
    there = source_stats(unescape_mount(name) for name in swaps)  # on threads: a hung NFS
    lost = [name for name in swaps if there.get(unescape_mount(name)) is None]  # mount gone
    swap = f"active swap on {', '.join(lost)}, a file not found here, or " if lost else ""
    return ("in use by the kernel, though no mount table lists it and no program has it open"
            f" ({swap}a file system on it unmounted with `umount -l` while in use?)")


def media_identity(path: str, *, context: pyudev.Context | None = None) -> MediaIdentity:
    """The medium behind ``path`` now, from sysfs (and udev for the serial); OSError if gone.

    What :attr:`Drive.identity` recorded when the plan was made is compared with this before
    opening, and with :func:`popsicle_py.media.identity_of_fd` after.
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
            device = pyudev.Devices.from_sys_path(context or udev_context(), sys_path)
        except pyudev.DeviceNotFoundError:
            device = None
        if device is not None:
            serial = _identity(device)[2]
            is_loop = bus_of(device) == "loop"
    return MediaIdentity(
        path, devnum, int(sectors) * 512 if sectors and sectors.isdigit() else 0,
        int(seq) if seq and seq.isdigit() else None, serial,
        loop_key(path, devnum) if is_loop else None, is_loop)


def still_same(drive: Drive, *, context: pyudev.Context | None = None,
               holders: Holders | None = None) -> str | None:
    """None if ``drive.path`` still holds the medium that was selected, else why not.

    A stick swapped in the same port between selection and writing gets the same path and
    perhaps the same size and serial; a loop device re-attached to another file the same path,
    number and size.  The media identity (diskseq, loop backing) tells them apart.  Then
    whoever holds it now (:func:`held_now`) refuses it, as the plan would have.
    """
    return media_changed(drive, context=context) or held_now(drive, holders)


def media_changed(drive: Drive, *, context: pyudev.Context | None = None) -> str | None:
    """Why ``drive.path`` no longer holds the medium that was selected (gone, another stick,
    a loop device re-attached), in one line; None when it still does."""
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


@record
class Holders:
    """Who holds any drive now: our mount table and swaps, and the system's other holders."""

    mounts: tuple[Mount, ...]
    facts: SystemFacts


def holders_now(of: frozenset[int] | None = None) -> Holders:
    """Read every holder once (the mount table, swaps, each namespace's mounts, loop devices
    over disks, every process's open descriptors: a scan of /proc, settled for ``of``)."""
    answers = ask_loops()
    own = mount_table()
    return Holders(current_mounts(own, answers=answers), SystemFacts(
        swaps=current_swaps(answers), foreign_mounts=foreign_mounts(own, answers=answers),
        loops=loops_over_devices(answers), file_loops=loops_over_files(own, answers),
        openers=openers(of, answers), answers=answers))


def held_now(drive: Drive, now: Holders | None = None) -> str | None:
    """Who holds ``drive`` now, in one line (None: nobody): the plan's rules on holders,
    read again just before the first write (``--unmount`` has run; a program may have
    opened it, a namespace mounted it, a loop device over what backs it been mounted or
    made swap, since the plan was made)."""
    now = now or holders_now()
    backing = backing_of(drive.devnum, now.facts.answers)
    own = tuple(f"mounted at {m}" for m in mountpoints_of(drive.devnum, now.mounts))
    stacked = stacked_on(drive.devnum)
    if stacked:  # a mapping or an array made since: the open would fail, saying less
        own += (f"in use by {', '.join(stacked)}",)
    swap = tuple(f"in use as swap ({s.path})" for s in now.facts.swaps
                 if overwrites(backing, s.devnums, s.files))
    reasons = tuple(dict.fromkeys(
        own + swap + busy_reasons(drive.devnum, backing, now.mounts,
                                  holders_beneath(backing, drive.devnum))
        + holder_reasons(drive.devnum, now.facts, backing)))
    return f"{drive.path} is {'; '.join(reasons)}" if reasons else None


def still_same_each(drives: Iterable[Drive] | None = None) -> Callable[[Drive], str | None]:
    """:func:`still_same` for the drives of one run (``drives``, when known), about to be
    opened: the holders are read once for all of them (a scan of /proc per drive cost 10 ms
    and more each, 0.3 s of the start of 32 drives), settled for these drives only."""
    of = None if drives is None else frozenset(d.devnum for d in drives)
    now = holders_now(of)
    return lambda drive: still_same(drive, holders=now if of is None or drive.devnum in of
                                    else holders_now())


def writers_now(drive: Drive, facts: SystemFacts | None = None) -> str | None:
    """Who holds ``drive`` open for writing now, in one line (None: nobody): ``verify``
    reads a drive that another program (another popsicle-py) is writing as busy, not as a
    mismatch."""
    facts = facts or SystemFacts(openers=openers())
    return busy_for_reading(drive.path, drive.devnum, facts)


def writers_each(drives: Iterable[Drive] | None = None) -> Callable[[Drive], str | None]:
    """:func:`writers_now` for the drives of one run: the open descriptors read once (settled
    for ``drives`` only, when known)."""
    of = None if drives is None else frozenset(d.devnum for d in drives)
    facts = SystemFacts(openers=openers(of))
    return lambda drive: writers_now(drive, facts if of is None or drive.devnum in of
                                     else None)


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
