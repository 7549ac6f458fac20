"""Which USB port a drive hangs off, and the identity every result carries.

The kernel hands a freed name (``/dev/sdb``) to the next stick plugged in, and cheap sticks
share serials, so a result names its drive by port, serial, size and a per-run number too.
The port path is the sysfs name of the drive's USB device (``1-1.2``: bus 1, root port 1, hub
port 2), which is also what is printed on a duplicator tower's labelled ports.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyudev

from popsicle_py.drives import Drive
from popsicle_py.drives.udev import udev_context
from popsicle_py.events import DriveInfo
from popsicle_py.records import record
from popsicle_py.units import format_link_speed

#: A link at or below this (Mbit/s) is USB 2.0 or older: about 40 MB/s at best.
USB2 = 480


@record
class UsbLink:
    """A drive's USB link: its port, the link's speed, and the hub it shares (if not a root
    port), with the hub's own upstream speed; speeds in Mbit/s, None when sysfs says none."""

    port_path: str
    speed: int | None
    hub: str | None = None
    hub_speed: int | None = None


def parse_speed(text: str | None) -> int | None:
    """sysfs ``speed`` ("480", "5000", "1.5") in whole Mbit/s, None when absent or odd."""
    try:
        value = float(text) if text else 0.0
    except ValueError:
        return None
    return max(1, round(value)) if value > 0 else None


def _speed_of(device: pyudev.Device | None) -> int | None:
    if device is None:
        return None
    try:
        value = device.attributes.get("speed")
    except (KeyError, OSError):
        return None
    return parse_speed(value.decode(errors="replace").strip() if isinstance(value, bytes)
                       else None if value is None else str(value).strip())


def usb_link(name: str, context: pyudev.Context | None = None) -> UsbLink | None:
    """The USB link of the block device named ``name`` (``sdb``), None when not on USB."""
    try:
        device = pyudev.Devices.from_name(context or udev_context(), "block", name)
        usb = device.find_parent("usb", "usb_device")
        if usb is None or str(usb.sys_name).startswith("usb"):
            return None
        hub = usb.parent
        hub_name = None if hub is None else str(hub.sys_name)
    except (pyudev.DeviceNotFoundError, OSError, ValueError, KeyError):
        return None
    if hub_name is None or hub_name.startswith("usb") or hub.subsystem != "usb":
        return UsbLink(str(usb.sys_name), _speed_of(usb))  # on a root port: nothing shared
    return UsbLink(str(usb.sys_name), _speed_of(usb), hub_name, _speed_of(hub))


def link_notes(links: Sequence[tuple[str, UsbLink | None]]) -> list[str]:
    """What a person should know about the drives' links: one on USB 2.0 (or slower) is
    slow whatever the stick; drives behind one hub share its upstream link."""
    notes = []
    for path, link in links:
        if link is not None and link.speed is not None and link.speed <= USB2:
            notes.append(f"{path} is on a USB 2.0 link ({format_link_speed(link.speed)}, "
                         "about 40 MB/s at most): a USB 3 port or cable would be faster"
                         if link.speed == USB2 else
                         f"{path} is on a USB 1 link ({format_link_speed(link.speed)}): "
                         "it will be very slow")
    hubs: dict[str, list[tuple[str, UsbLink]]] = {}
    for path, link in links:
        if link is not None and link.hub is not None and link.speed is not None:
            hubs.setdefault(link.hub, []).append((path, link))
    for hub, members in hubs.items():
        upstream = members[0][1].hub_speed
        total = sum(link.speed or 0 for _, link in members)
        if len(members) > 1 and upstream is not None and upstream < total:
            names = ", ".join(path for path, _ in members)
            notes.append(f"{names} share the hub at port {hub}, whose own link "
                         f"({format_link_speed(upstream)}) is slower than theirs together "
                         f"({format_link_speed(total)}): they will share its speed")
    return notes


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


def link_of(drive: Drive) -> UsbLink | None:
    """The drive's USB link (None when not on USB, as a loop device is not)."""
    return usb_link(drive.name) if drive.bus == "usb" else None


def drive_info(drive: Drive, seq: int | None) -> DriveInfo:
    """The identity of ``drive`` for events and reports."""
    link = link_of(drive)
    return DriveInfo(seq=seq, port_path=port_path_of(drive), vendor=drive.vendor.strip(),
                     model=drive.model.strip(), serial=drive.serial.strip(), size=drive.size,
                     link_speed=None if link is None else link.speed)
