"""The drive layer's decisions: plain functions over plain data, testable without any drive.

Which disks are system drives (:func:`system_reason`), which kinds may be targets
(:func:`kind_reason`, :func:`eligibility`), why one is busy (:func:`busy_reasons`), who else
holds it (:func:`holder_reasons`; for a read, :func:`writer_reasons`), every
reason not to write one now (:func:`refusals`), and the lines that tell the user
(:func:`explain`).  What a disk's bytes are stored on counts as much as the disk: the rules
compare :class:`~.model.Backing` sets, never prefixes of names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from popsicle_py.drives.model import (
    REASON_IMAGE,
    REASON_NO_MEDIUM,
    REASON_NOT_USB,
    REASON_READ_ONLY,
    REASON_SWAP,
    Backing,
    Drive,
    Inode,
    LoopOver,
    Mount,
    Opener,
    Refusal,
    SystemFacts,
)
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


def overwrites(target: Backing, devnums: frozenset[int], files: frozenset[Inode]) -> bool:
    """Whether writing ``target`` overwrites storage that something resting on ``devnums``
    and ``files`` (a mount, a swap area, the image, another target) uses."""
    return bool(target.devnums & devnums or target.files & files)


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
    if backing.unknown:
        found.setdefault(backing.unknown, None)
    return tuple(found)


def in_namespace(mount: Mount, devnum: int) -> str:
    """``mounted at /mnt (/dev/loop9) in the mount namespace of pid 1234 (sleep)``: the
    device is named when it is not the disk ``devnum`` itself (a loop window over it)."""
    where = f"mounted at {mount.mountpoint}"
    if mount.sources and devnum not in mount.sources:
        where += f" ({mount.device})"
    if mount.namespace is not None:
        where += f" in the mount namespace of pid {mount.namespace.pid} " \
                 f"({mount.namespace.program})"
    return where


def holder_reasons(devnum: int, facts: SystemFacts, backing: Backing | None = None
                   ) -> tuple[str, ...]:
    """Who holds the disk ``devnum``, besides our own mounts and dm/md holders: a mount in
    another mount namespace (which ``--unmount`` cannot reach), a loop device over it at any
    offset, a process with it (a partition of it, a loop device over it) open.  With its
    ``backing``, whoever holds what it is stored on too (a loop device over the same file),
    but not a loop device it stands on: that is its own storage, as a disk is a partition's.

    Each is refused: writing under a mounted filesystem destroys it, and a program reading
    the disk (a backup, ``dd``) would copy a half-written one.
    """
    def holds(devnums: frozenset[int], files: frozenset[Inode] = frozenset()) -> bool:
        return devnum in devnums or (backing is not None and overwrites(backing, devnums, files))

    found: dict[str, None] = {}
    for mount in facts.foreign_mounts:
        if mount.namespace is not None and holds(mount.devnums, mount.files):
            found.setdefault(f"{in_namespace(mount, devnum)}, not ours:"
                             " unmount it there", None)
    for loop in facts.loops:
        if loop.devnum == devnum or (backing is not None and loop.devnum in backing.devnums):
            continue  # the disk itself, or what it is stored on (a loop over a loop device)
        if holds(loop.devnums):
            over = "it" if devnum in loop.devnums else "what it is stored on"
            found.setdefault(f"in use by {loop.device}, a loop device over {over} at offset "
                             f"{loop.offset}", None)
    for loop in facts.file_loops:
        if loop.devnum != devnum and holds(loop.devnums):
            found.setdefault(_loop_over_file(loop, devnum), None)
    for opener in facts.openers:
        if holds(opener.devnums, opener.files) and not udev_probing(opener):
            found.setdefault(_open_in(opener, devnum), None)
    return tuple(found)


def _loop_over_file(loop: LoopOver, devnum: int) -> str:
    """``in use by /dev/loop1 (itself in use by /dev/dm-0), a loop device over
    /mnt/disk.img, a file on it: detach it first``."""
    above = f" (itself in use by {', '.join(loop.holders)})" if loop.holders else ""
    on = "it" if devnum in loop.devnums else "what it is stored on"
    return (f"in use by {loop.device}{above}, a loop device over {loop.file or 'a file'}, a "
            f"file on {on} (its file system cannot be unmounted while it is used)")


#: udev's own workers: on every "add" or "change" of a disk (a stick just plugged in, a drive
#: just closed after writing) one opens it read-only for a moment to read its signatures.
UDEV_PROGRAMS = frozenset({"(udev-worker)", "systemd-udevd", "udevd"})


def udev_probing(opener: Opener) -> bool:
    """udev reading a disk's signatures: transient, read-only, and done again after we write
    (it watches for the close), so it holds nothing; refusing it would refuse freshly plugged
    sticks at random.  udev opening a disk for writing still counts."""
    return not opener.writing and opener.process.program in UDEV_PROGRAMS


def writer_reasons(devnum: int, facts: SystemFacts) -> tuple[str, ...]:
    """Processes that hold the disk ``devnum`` open for writing: what a ``verify`` read
    would compare is changing under it (another popsicle-py writing it)."""
    return tuple(dict.fromkeys(_open_in(o, devnum, writing=True) for o in facts.openers
                               if o.writing and devnum in o.devnums))


def busy_for_reading(path: str, devnum: int, facts: SystemFacts) -> str | None:
    """The one line refusing to read the disk ``devnum`` (``verify``), or None."""
    reasons = writer_reasons(devnum, facts)
    return f"{path} is busy: {'; '.join(reasons)}" if reasons else None


def _open_in(opener: Opener, devnum: int, *, writing: bool = False) -> str:
    how = "open for writing" if writing else "open"
    through = f" through {opener.device}" if opener.devnum != devnum else ""
    return f"{how} in {opener.process.program} (pid {opener.process.pid}){through}"


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
        if os.path.basename(os.path.realpath(path)).startswith("loop"):  # /dev: no hang
            return f"{path} is a loop device with no file attached"
        return f"{path} has no medium (is a card inserted?)"
    if reason == REASON_READ_ONLY:
        return f"{path} is read-only (write-protected)"
    if reason == REASON_IMAGE:
        return f"{path} holds the image being written"
    if reason == REASON_SWAP:
        return f"{path} is a system drive (active swap)"
    return f"{path} cannot be written: {reason}"


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
    small = too_small(drive, image_size)
    if small is not None:
        found.append(small)
    if drive.mountpoints and not unmount:
        at = ", ".join(drive.mountpoints)
        # --unmount cures a mount alone: with a holder or a user beside it (a loop device over
        # a file on it, a program in it) the unmount would fail, and the advice mislead.
        advice = "" if drive.holders or drive.busy else "; use --unmount to unmount it"
        found.append(Refusal("mounted", f"mounted at {at}",
                             f"{path} is mounted at {at}{advice}"))
    if drive.holders:
        by = ", ".join(drive.holders)
        found.append(Refusal("held", f"in use by {by}",
                             f"{path} is in use by {by}; deactivate that first"))
    for reason in drive.busy:
        found.append(Refusal("busy", reason, f"{path} is {reason}"))
    return found


def too_small(drive: Drive, image_size: int | None) -> Refusal | None:
    """The image does not fit on ``drive``: a reason not to write it, nor to read it back to
    compare (``verify``); None when it fits or its size is unknown."""
    if image_size is None or image_size <= drive.size:
        return None
    image, size = _sizes(image_size, drive.size)
    return Refusal("too-small", f"smaller than the image ({size} drive, {image} image)",
                   f"image is larger than {drive.path}: {image} image, {size} drive")


def _sizes(image_size: int, drive_size: int) -> tuple[str, str]:
    """Both sizes for the user; exact bytes too when rounding would make them look equal."""
    image, drive = format_size(image_size), format_size(drive_size)
    if image.replace(".0 ", " ") == drive.replace(".0 ", " "):  # 2.0 MiB and 2 MiB look alike
        image, drive = f"{image} ({image_size} bytes)", f"{drive} ({drive_size} bytes)"
    return image, drive
