"""Which USB port a drive hangs off, and the identity every result carries.

The kernel hands a freed name (``/dev/sdb``) to the next stick plugged in, and cheap sticks
share serials, so a result names its drive by port, serial, size and a per-run number too.
The port path is the sysfs name of the drive's USB device (``1-1.2``: bus 1, root port 1, hub
port 2), which is also what is printed on a duplicator tower's labelled ports.
"""

from __future__ import annotations

import pyudev

from popsicle_py.drives import Drive
from popsicle_py.drives.udev import udev_context
from popsicle_py.events import DriveInfo


def usb_port_path(name: str, context: pyudev.Context | None = None) -> str | None:
    """The USB port path of the block device named ``name`` (``sdb``), None when not on USB.

    Found by name, not number: /sys/dev/block links are missing under umockdev.
    """
    try:
        device = pyudev.Devices.from_name(context or udev_context(), "block", name)
        usb = device.find_parent("usb", "usb_device")
    except (pyudev.DeviceNotFoundError, OSError, ValueError, KeyError):
        return None
    if usb is None:
        return None
    name = str(usb.sys_name)
    return None if name.startswith("usb") else name  # "usb1" is a root hub, not a port


def port_path_of(drive: Drive) -> str | None:
    """The drive's port path: drives.py's own when it has one, else read from sysfs here."""
    known = getattr(drive, "port_path", None)
    if isinstance(known, str) and known:
        return known
    return usb_port_path(drive.name)


def drive_info(drive: Drive, seq: int | None) -> DriveInfo:
    """The identity of ``drive`` for events and reports."""
    return DriveInfo(seq=seq, port_path=port_path_of(drive), vendor=drive.vendor.strip(),
                     model=drive.model.strip(), serial=drive.serial.strip(), size=drive.size)
