"""Checking a set of targets before anything is written to any of them.

A refused target stops the whole run, and the user gets every reason at once (one line per
problem) rather than fixing them one run at a time.  The rules are plain functions over a
:class:`~popsicle_py.drives.Drive` (:func:`refusals`, :func:`warnings_for`), testable without a
drive; :func:`make_plan` (drives to write), :func:`make_read_plan` (drives to read back, for
``verify``) and :func:`unmount_targets` are the thin I/O edges.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
from collections.abc import Sequence
from dataclasses import field

import pyudev

from popsicle_py import drives
from popsicle_py.drives import Drive, TargetError
from popsicle_py.drives.udev import udev_context
from popsicle_py.errors import Refused
from popsicle_py.records import record
from popsicle_py.units import format_size

DEFAULT_MAX_AUTO_SIZE = 128 * 2**30


@record
class Plan:
    """The checked targets, what was skipped (notes) and what to confirm (warnings per path)."""

    targets: tuple[Drive, ...]
    notes: tuple[str, ...] = ()
    warnings: dict[str, tuple[str, ...]] = field(default_factory=dict)


class PlanError(Refused):
    """Targets refused before anything was written; one line per problem (exit 2)."""


def refusals(drive: Drive, image_size: int | None, unmount: bool) -> list[str]:
    """Why ``drive`` cannot be written now, one line each; empty when it can.

    The rules are :func:`popsicle_py.drives.refusals` (shared with ``watch``).
    """
    return [r.line for r in drives.refusals(drive, image_size=image_size, unmount=unmount)]


def shared_storage(a: Drive, b: Drive) -> bool:
    """Whether writing one target overwrites what the other is stored on (two loop devices
    over one file, a loop device over another target or over a file on it)."""
    if a.backing is None or b.backing is None:
        return False
    return (drives.overwrites(a.backing, b.backing.all_devnums, b.backing.all_files)
            or drives.overwrites(b.backing, a.backing.all_devnums, a.backing.all_files))


def warnings_for(drive: Drive, *, unmount: bool, max_auto_size: int = DEFAULT_MAX_AUTO_SIZE
                 ) -> tuple[str, ...]:
    """What the confirmation should point out about a target that is allowed."""
    found: list[str] = []
    if drive.size > max_auto_size:
        found.append(f"larger than {format_size(max_auto_size)}")
    if drive.bus not in ("usb", "sd", "loop"):
        found.append(f"not a USB or SD drive ({drive.bus})")
    if drive.mountpoints and unmount:
        found.append(f"mounted at {', '.join(drive.mountpoints)} (will be unmounted)")
    return tuple(found)


def _resolve(devices: Sequence[str], image_path: str | None, context: pyudev.Context,
             facts: drives.SystemFacts) -> tuple[list[Drive], dict[int, str], list[str]]:
    """The named devices as drives, in the order given: (drives, the path each device number
    was named by, one line per device that cannot be a target or is named twice)."""
    lines: list[str] = []
    targets: list[Drive] = []
    named: dict[int, str] = {}
    for path in devices:
        try:
            drive = drives.drive_for_path(path, image_path=image_path, context=context,
                                          facts=facts)
        except TargetError as e:
            lines.append(str(e))
            continue
        if drive.devnum in named:
            lines.append(f"{path} and {named[drive.devnum]} are the same drive ({drive.path});"
                         " name it once")
            continue
        named[drive.devnum] = path
        targets.append(drive)
    return targets, named, lines


def make_plan(devices: Sequence[str], *, all_usb: bool, image_path: str | None,
              image_size: int | None, unmount: bool,
              max_auto_size: int = DEFAULT_MAX_AUTO_SIZE,
              context: pyudev.Context | None = None) -> Plan:
    """Resolve and check every target; raise PlanError listing every refusal.

    Explicitly named devices come first, in the order given; ``all_usb`` adds the eligible USB
    and SD drives discovery finds, skipping (with a note) the ineligible and those larger than
    ``max_auto_size``, which a user can still name explicitly.
    """
    context = context or udev_context()
    # Holders settled for the named drives only (any drive may be a target with all_usb).
    facts = drives.gather_facts(image_path, None if all_usb else drives.named_devnums(devices))
    notes: list[str] = []
    targets, named, lines = _resolve(devices, image_path, context, facts)

    if all_usb:
        for drive in drives.discover(context, image_path=image_path, facts=facts):
            if drive.devnum in named:
                continue
            skip = [r for r in drives.refusals(drive, image_size=None, auto=True,
                                               max_size=max_auto_size, unmount=True)
                    if r.kind in ("ineligible", "max-size")]
            if skip and skip[0].kind == "max-size":
                notes.append(f"skipped {drive.describe()}: larger than"
                             f" {format_size(max_auto_size)}; name it explicitly to use it")
            elif skip:
                notes.append(f"skipped {drive.describe()}: {skip[0].reason}")
            else:
                named[drive.devnum] = drive.path
                targets.append(drive)

    for index, drive in enumerate(targets):
        lines.extend(refusals(drive, image_size, unmount))
        for other in targets[:index]:
            if shared_storage(drive, other):
                lines.append(f"{drive.path} and {other.path} are stored on the same"
                             " device or file: writing one overwrites the other; name one")
    if not targets and not lines:
        if all_usb:
            lines.append("no target drives: no eligible USB or SD drive was found")
        else:
            lines.append("no target drives: name devices or use --all-usb")
    if lines:
        raise PlanError(lines, notes)
    warnings = {d.path: w for d in targets
                if (w := warnings_for(d, unmount=unmount, max_auto_size=max_auto_size))}
    return Plan(tuple(targets), tuple(notes), warnings)


def make_read_plan(devices: Sequence[str], image_size: int | None, *,
                   image_path: str | None = None,
                   context: pyudev.Context | None = None) -> Plan:
    """Resolve the drives to read back and compare with an image (``verify``); raise
    PlanError listing every refusal.

    The named devices are resolved as :func:`make_plan` resolves them, with its words: what can
    never be a target (missing, not a block device, a partition, a system drive) and a drive
    named twice are refused, and so is a drive smaller than the image (``image_size``; None:
    not known, not checked) and one another program holds open for writing (busy: what would
    be compared is changing).  Reading writes nothing, so the rest of the writing rules do not
    apply: a mounted, read-only or non-USB drive, or one that holds the image or that other
    programs read, is read.  A drive that holds the image (``image_path``: the drive itself
    under any name, a partition of it, a loop device over it, or a file on it) is refused as
    flash refuses it: compared with itself, it would always "match".
    """
    facts = drives.gather_facts(of=drives.named_devnums(devices))
    targets, _, lines = _resolve(devices, None, context or udev_context(), facts)
    image_devnums, image_files = (drives.path_storage(image_path, facts.answers)
                                  if image_path else (frozenset(), frozenset()))
    for drive in targets:
        if drive.backing is not None and drives.overwrites(drive.backing, image_devnums,
                                                           image_files):
            lines.append(f"{drive.path} holds the image being compared (it would match "
                         "itself); name another image or drive")
            continue
        small = drives.too_small(drive, image_size)
        if small is not None:
            lines.append(small.line)
        busy = drives.busy_for_reading(drive.path, drive.devnum, facts)
        if busy is not None:
            lines.append(busy)
    if not targets and not lines:
        lines.append("no target drives: name devices")
    if lines:
        raise PlanError(lines)
    return Plan(tuple(targets))


def _umount(mountpoint: str, device: str = "") -> str | None:
    """Unmount one mountpoint; None on success (or if already gone), else umount's reason.

    Without root, udisks2 unmounts it when it can (polkit decides), as a desktop would.
    """
    if os.geteuid() != 0 and device.startswith("/dev/"):
        reason = _umount_udisks(device)
        if reason != _NO_UDISKS:
            return reason
    try:
        result = subprocess.run(["umount", mountpoint], capture_output=True, text=True,
                                env={**os.environ, "LC_ALL": "C"}, check=False)
    except FileNotFoundError:
        return _umount_libc(mountpoint)
    if result.returncode == 0:
        return None
    message = (result.stderr.strip().splitlines() or ["failed"])[0]
    message = message.removeprefix("umount: ").removeprefix(f"{mountpoint}: ").rstrip(".")
    if "not mounted" in message:
        return None
    return message


_NO_UDISKS = "udisks2 is not available"


def _umount_udisks(device: str) -> str | None:
    """Filesystem.Unmount through udisks2; :data:`_NO_UDISKS` when it is not there."""
    from popsicle_py import udisks  # D-Bus only for users without root

    try:
        udisks.client()
    except udisks.Unavailable:
        return _NO_UDISKS
    try:
        udisks.unmount(device)
    except OSError as exc:
        return str(exc)
    return None


def _umount_libc(mountpoint: str) -> str | None:
    """umount2(2) for systems without umount(8)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), 0) == 0:
        return None
    code = ctypes.get_errno()
    if code == errno.EINVAL:  # not a mountpoint (any more)
        return None
    return "target is busy" if code == errno.EBUSY else os.strerror(code)


def unmount_targets(plan: Plan) -> list[str]:
    """Unmount everything mounted from the targets, deepest and latest first; what was
    unmounted, one line each (``unmounted /media/stick (/dev/sdb1)``), for the user to read.

    The mount table is read again here (a desktop may have automounted a partition since the
    plan was made).  Every mountpoint is tried; all failures are reported together.
    """
    devnums = {d.devnum for d in plan.targets}
    mounts = [m for m in drives.current_mounts() if m.devnums & devnums]
    order = sorted(enumerate(mounts),
                   key=lambda im: (-im[1].mountpoint.rstrip("/").count("/"), -im[0]))
    failures: list[str] = []
    done: list[str] = []
    for _, mount in order:
        reason = _umount(mount.mountpoint, mount.device)
        if reason:
            failures.append(f"could not unmount {mount.mountpoint} ({mount.device}): {reason}")
        else:
            done.append(f"unmounted {mount.mountpoint} ({mount.device})")
    if failures:
        raise PlanError(failures)
    return done
