"""Powering a finished drive off (duplicator mode), the way udisks2 does, within a time limit.

A drive that is written and verified is flushed, then the ``remove`` attribute of its USB
device is written: the kernel detaches it and cuts its port's power, so its LED goes dark.
A stick that stops answering there would hold its open, its flush or that write for as long
as the kernel retries (minutes): the work runs on a thread of its own, and the drive's
thread stops waiting for it after the stall timeout or at a stop (Ctrl-C), so the session
never waits for a dead stick it has finished with.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pyudev

from popsicle_py.drives import Drive
from popsicle_py.engine.watched import WorkStalled, watched

#: What the drive's thread says when a stop came while the drive was being powered off.
STOPPED = "stopped while it was being powered off"


def _usb_parent(device: pyudev.Device) -> pyudev.Device | None:
    try:
        return device.find_parent("usb", "usb_device")
    except (KeyError, OSError):
        return None


def power_off(device: pyudev.Device, drive: Drive,
              context: pyudev.Context | None = None) -> str | None:
    """Power a finished drive off the way udisks2 does; None when done, else why not.

    Flush the drive, then write 1 to the ``remove`` attribute of its parent USB device: the
    kernel detaches it and cuts its port's power, so its LED goes dark.  Not for an SD card in
    a built-in reader (that would take the reader away), nor when another disk shares the USB
    device (a multi-slot card reader).  Blocks as long as the drive does: see
    :func:`power_off_within`.
    """
    if drive.bus == "sd":
        return "an SD card in a built-in reader is not powered off"
    usb = _usb_parent(device)
    if usb is None:
        return "it has no USB device to power off"
    prefix = usb.sys_path.rstrip("/") + "/"
    context = context or pyudev.Context()
    others = sorted(d.device_node or f"/dev/{d.sys_name}"
                    for d in context.list_devices(subsystem="block", DEVTYPE="disk")
                    if d.sys_path.startswith(prefix) and d.sys_path != device.sys_path)
    if others:
        return f"{', '.join(others)} share(s) its USB device"
    try:
        st = os.stat(drive.path)
        if st.st_rdev != drive.devnum:
            return f"{drive.path} is another drive now"
        if os.geteuid() != 0:  # without root, udisks2 powers it off if polkit allows
            from popsicle_py import udisks
            return udisks.power_off(drive.path)
        fd = os.open(drive.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(os.path.join(usb.sys_path, "remove"), "w") as f:
            f.write("1")
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def bounded(work: Callable[[], str | None], *, cancel: Callable[[], bool],
            limit: float | None, name: str) -> str | None:
    """``work()`` (None when done, else why not) on a thread of its own, stop signals
    blocked; why not when it did not return within ``limit`` seconds (None: no limit) or
    ``cancel()`` said stop first.  The worker is left in its call, as a stalled lane is."""
    try:
        answer = watched(lambda _clock, _stopped: (work(),), cancel=cancel,
                         stall_timeout=limit, name=name)
    except WorkStalled:
        return f"it did not answer for {limit:g} s"
    return STOPPED if answer is None else answer[0]


def power_off_within(device: pyudev.Device, drive: Drive, *, cancel: Callable[[], bool],
                     limit: float | None) -> str | None:
    """:func:`power_off`, given up after ``limit`` seconds or at a stop."""
    return bounded(lambda: power_off(device, drive), cancel=cancel, limit=limit,
                   name=f"power-off-{drive.name}")
