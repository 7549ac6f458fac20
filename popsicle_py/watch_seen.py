"""One appearance of a drive in a duplicator session, and what its uevents say about it."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

import pyudev

from popsicle_py import drives
from popsicle_py.drives import Drive
from popsicle_py.events import DriveInfo, DriveResult
from popsicle_py.identity import MediaIdentity

#: The disks plugged in when a session was asked for, by device number.
Present = Mapping[int, MediaIdentity]


def disks_present(context: pyudev.Context | None = None) -> dict[int, MediaIdentity]:
    """The disks plugged in now: taken when a session is asked for, before its download,
    checksum and decompression, so that a drive plugged in meanwhile is a new one."""
    facts = drives.gather_facts(None)
    found = (context or pyudev.Context()).list_devices(subsystem="block", DEVTYPE="disk")
    identities = (drives.build_drive(device, facts, explicit=False).identity
                  for device in found)
    return {identity.devnum: identity for identity in identities}


def was_present(present: Present, drive: Drive) -> bool:
    """``drive`` is the medium that was there when the session was asked for (pure)."""
    before = present.get(drive.devnum)
    return before is not None and drives.same_media(before, drive.identity) is None


def swapped(known: Drive, device: pyudev.Device) -> bool:
    """The medium under ``device`` is not ``known``'s: the kernel gave it a new diskseq (our
    own writes' "change" events, a partition table re-read, keep it)."""
    now, before = sysfs_number(device, "diskseq"), known.identity.diskseq
    return now is not None and before is not None and now != before


def sysfs_number(device: pyudev.Device, name: str) -> int | None:
    """A number of the device's sysfs attributes (``size``, ``diskseq``), None if absent."""
    try:
        value = device.attributes.get(name)
    except (KeyError, OSError):
        return None
    text = value.decode(errors="replace").strip() if isinstance(value, bytes) else str(value)
    return int(text) if text.isdigit() else None


def node_gone(drive: Drive) -> bool:
    """``drive``'s node is gone, or is another device's: it was pulled (its "remove" uevent
    perhaps not read yet), so a job that could not open it ends "removed", not an error."""
    try:
        return os.stat(drive.path).st_rdev != drive.devnum
    except FileNotFoundError:
        return True
    except OSError:
        return False


class Seen:
    """One appearance of a drive in this session (the same stick re-inserted is a new one)."""

    def __init__(self, device: pyudev.Device, drive: Drive) -> None:
        self.device, self.drive = device, drive
        self.path = drive.path
        self.announced = False  # drive_added was emitted
        self.present_at_start = False  # plugged in before the start, and left alone
        self.removed = threading.Event()  # pulled (or medium gone) since it appeared
        self.thread: threading.Thread | None = None
        self.finished = threading.Event()  # its job (and power off) is over
        self.result: DriveResult | None = None
        self.ended_removed = False  # the job's end was judged "removed"
        self.info: DriveInfo | None = None  # who it is, with its number in this session

    @property
    def known(self) -> bool:
        """Present at the start, or taken: another "add" for its medium is not a new drive."""
        return self.present_at_start or self.thread is not None

    @property
    def in_flight(self) -> bool:
        return self.thread is not None and not self.finished.is_set()
