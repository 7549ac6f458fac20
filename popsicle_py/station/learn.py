"""Learn a slot map: the operator plugs a stick into each slot in turn; udev says the port.

Nothing is opened or written: the port path of each whole disk that appears is read from
sysfs.  A stick on no USB port, or on a port already learned, is said and not taken.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyudev

from popsicle_py.ports import usb_port_path
from popsicle_py.station.slots import Slot, learned

POLL_INTERVAL = 0.1


def learn(labels: Sequence[str], say: Callable[[str], None],
          cancel: Callable[[], bool]) -> list[Slot] | None:
    context = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(context)
    monitor.filter_by("block", "disk")
    monitor.start()
    found: list[Slot] = []
    say(f"plug a stick into slot {labels[0]} (Ctrl-C to give up)")
    while len(found) < len(labels):
        if cancel():
            return None
        device = monitor.poll(timeout=POLL_INTERVAL)
        if device is None or device.action != "add":
            continue
        node = device.device_node or f"/dev/{device.sys_name}"
        port = usb_port_path(device.sys_name, context)
        label = labels[len(found)]
        why = learned(found, port)
        if why is not None:
            say(f"{node}: {why}; plug a stick into slot {label}")
            continue
        assert port is not None
        found.append(Slot(label, port))
        say(f"slot {label}: port {port} ({node})")
        if len(found) < len(labels):
            say(f"plug a stick into slot {labels[len(found)]}")
    return found
