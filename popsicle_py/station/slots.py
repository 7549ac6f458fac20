"""The slot map: USB port paths to the labels printed on a hub or a tower, in the tower's order.

A TOML file, written by ``popsicle-py slots FILE`` (the operator plugs a stick into each slot
in turn) or by hand::

    # popsicle-py slot map: the USB port of each slot, in the order of the page's grid
    [[slot]]
    label = "1"
    port = "1-1.2"

With a map, a station writes only the drives on its ports: a stick anywhere else is
announced and never opened.  Pure code over plain data; reading the file is the one edge.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence

from popsicle_py import files
from popsicle_py.records import record

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: A USB port path as the kernel names it: bus, then port numbers (``1-1.2``, ``3-4``).
PORT_PATH = re.compile(r"^\d+-\d+(\.\d+)*$")
#: A map of 256 slots is some 20 KB; a file much larger is no slot map.
MAX_MAP_FILE = 1 << 20
#: A label a person reads on the hub and types in a URL: short, no slashes or spaces.
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,15}$")


class SlotMapError(Exception):
    """The slot map cannot be used; one line for the user (exit 2, nothing written)."""


@record
class Slot:
    label: str
    port: str


@record
class SlotMap:
    """The slots in the map's order; ``label_of`` finds a drive's slot by its port path."""

    slots: tuple[Slot, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(s.label for s in self.slots)

    def label_of(self, port: str | None) -> str | None:
        for slot in self.slots:
            if port is not None and slot.port == port:
                return slot.label
        return None

    def port_of(self, label: str) -> str | None:
        for slot in self.slots:
            if slot.label == label:
                return slot.port
        return None


def parse(text: str, name: str = "slot map") -> SlotMap:
    """A slot map from TOML text; SlotMapError says the first problem in one line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SlotMapError(f"{name}: not valid TOML: {exc}") from None
    entries = data.get("slot")
    if not isinstance(entries, list) or not entries:
        raise SlotMapError(f"{name}: no [[slot]] entries (each has a label and a port)")
    slots: list[Slot] = []
    for number, entry in enumerate(entries, 1):
        label, port = entry.get("label"), entry.get("port")
        if not isinstance(label, str) or not LABEL.match(label):
            raise SlotMapError(f"{name}: slot {number}: the label must be 1 to 16 letters, "
                               f"digits or _.:- (got {label!r})")
        if not isinstance(port, str) or not PORT_PATH.match(port):
            raise SlotMapError(f"{name}: slot {label}: the port must be a USB port path "
                               f"such as 1-1.2 (got {port!r})")
        slots.append(Slot(label, port))
    check_unique(slots, name)
    return SlotMap(tuple(slots))


def check_unique(slots: Sequence[Slot], name: str) -> None:
    seen_labels: set[str] = set()
    seen_ports: dict[str, str] = {}
    for slot in slots:
        if slot.label in seen_labels:
            raise SlotMapError(f"{name}: the label {slot.label!r} is used twice")
        if slot.port in seen_ports:
            raise SlotMapError(f"{name}: slots {seen_ports[slot.port]} and {slot.label} have "
                               f"the same port {slot.port}")
        seen_labels.add(slot.label)
        seen_ports[slot.port] = slot.label


def load(path: str) -> SlotMap:
    try:
        text = files.read_regular(path, MAX_MAP_FILE).decode("utf-8")
    except OSError as exc:  # a FIFO, a device, a huge file too: one line, nothing waits
        raise SlotMapError(f"--slots {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SlotMapError(f"--slots {path}: not a text file") from None
    return parse(text, f"--slots {path}")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dump(slots: Iterable[Slot]) -> str:
    """The TOML text of a map (what ``parse`` reads back)."""
    lines = ["# popsicle-py slot map: the USB port of each slot, in the order of the page's grid",
             "# (made by `popsicle-py slots`; edit the labels freely)"]
    for slot in slots:
        lines += ["", "[[slot]]", f"label = {_quote(slot.label)}", f"port = {_quote(slot.port)}"]
    return "\n".join(lines) + "\n"


def learn_labels(count: int | None, labels: str | None) -> tuple[str, ...]:
    """The labels to learn, in order: ``--labels A1,A2`` or ``--count 16`` (1..16)."""
    if labels:
        found = tuple(part.strip() for part in labels.split(",") if part.strip())
    else:
        found = tuple(str(n) for n in range(1, (count or 0) + 1))
    if not found:
        raise SlotMapError("say which slots to learn: --count N (labels 1..N) or --labels A,B")
    for label in found:
        if not LABEL.match(label):
            raise SlotMapError(f"--labels: {label!r}: a label is 1 to 16 letters, digits or "
                               "_.:-")
    if len(set(found)) != len(found):
        raise SlotMapError("--labels: a label is given twice")
    return found


def learned(slots: Sequence[Slot], port: str | None) -> str | None:
    """Why a stick plugged in while learning is not taken as the next slot, or None."""
    if port is None:
        return "it is not on a USB port"
    for slot in slots:
        if slot.port == port:
            return f"port {port} is slot {slot.label} already"
    return None
