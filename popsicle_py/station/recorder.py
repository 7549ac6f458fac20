"""Events in, journal rows out: a row when a drive starts, completed when it ends.

Fed on the session's thread (the drives' threads only queue their events), before the page
and the terminal see an event, so that a result anyone has seen is already on disk.  Which
slot an event is about is decided once, here, by :class:`Tagger`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from popsicle_py import events, rows
from popsicle_py.report import record
from popsicle_py.station.journal import Journal
from popsicle_py.station.slots import SlotMap


@dataclass
class Tagger:
    """The slot of each event's drive: the map's label for its port (no map: the port path,
    else the device name).  A device name is reused by the kernel; its slot is re-decided at
    each ``drive_added``.

    A slot holds one drive at a time, from its admission (:meth:`take`) until it ends, is
    refused after all, or leaves: a second drive on the same port (a card reader's second
    card) is refused in a mapped slot, and gets a tile of its own (``PORT/NAME``) without a
    map.  :meth:`take` and :meth:`slot` both run on the session's thread.
    """

    slots: SlotMap | None
    by_device: dict[str, str] = field(default_factory=dict)
    #: seq -> the slot of the drive given that seq: its events (phases, progress, result)
    #: find their slot even when another drive has its device name by then (a stick pulled
    #: mid-write, another in).  An int and a label per drive, kept for the session.
    by_seq: dict[int, str | None] = field(default_factory=dict)
    #: slot -> (device, seq) of the drive it holds (seq once the drive was announced).
    held: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    #: device -> the tile of its own a drive on a busy port gets (no map), until announced.
    assigned: dict[str, str] = field(default_factory=dict)

    def label_for(self, port: str | None, device: str) -> str | None:
        if self.slots is not None:
            return self.slots.label_of(port)
        return port or device.rsplit("/", 1)[-1]

    def take(self, port: str | None, device: str) -> str | None:
        """Admission: the drive ``device`` on ``port`` takes its slot; why not (another drive
        holds that slot), or None."""
        label = self.label_for(port, device)
        if label is None:
            return None
        holder = self.held.get(label)
        if holder is not None and holder[0] != device:
            if self.slots is not None:
                return f"slot {label} holds {holder[0]} already: one drive per slot"
            label = f"{label}/{device.rsplit('/', 1)[-1]}"  # no map: a tile of its own
            self.assigned[device] = label
        self.held[label] = (device, None)
        return None

    def _free(self, label: str | None, device: str, seq: int | None = None) -> None:
        holder = self.held.get(label) if label is not None else None
        if label is None or holder is None or holder[0] != device:
            return
        if seq is not None and holder[1] is not None and seq != holder[1]:
            return  # the end of an earlier drive of that name, gone meanwhile
        del self.held[label]

    def slot(self, event: events.WatchEvent) -> str | None:
        match event:
            case events.DriveAdded(device=device, info=info, eligible=eligible):
                label = self.assigned.pop(device, None) or self.label_for(
                    info.port_path if info else None, device)
                if info is not None and info.seq is not None:
                    self.by_seq[info.seq] = label
                if label is None:
                    self.by_device.pop(device, None)
                else:
                    self.by_device[device] = label
                    if not eligible:  # refused after all (unfit, the rows ran out...)
                        self._free(label, device)
                    elif self.held.get(label, (None,))[0] == device:
                        self.held[label] = (device, info.seq if info else None)
                return label
            case events.DriveRemoved(device=device):
                label = self.by_device.get(device)
                self._free(label, device)
                return label
            case events.Phase(seq=int(number)) | events.Progress(seq=int(number)) \
                    if number in self.by_seq:
                return self.by_seq[number]  # its drive's, whoever has its name by now
            case events.Phase(device=str(device)) | events.Progress(device=str(device)) | \
                    events.Probed(device=device):
                return self.by_device.get(device)
            case events.Result(result=r):
                seq = r.drive.seq if r.drive is not None else None
                if seq is not None and seq in self.by_seq:
                    label = self.by_seq[seq]  # kept: a powered-off phase comes after
                else:
                    label = self.by_device.get(r.device)
                self._free(label, r.device, seq)
                return label
        return None


class Recorder:
    """Feeds the journal: ``handle(event, slot)``."""

    def __init__(self, journal: Journal, image: str, sha256: str, verify: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.journal = journal
        self.image, self.sha256, self.verify = image, sha256, verify
        self.clock = clock
        #: Each drive in flight is keyed (device, seq): a device name is reused by the
        #: kernel, and a drive pulled mid-write ends after another one got its name.
        self.rows: dict[tuple[str, int | None], int] = {}
        self.current: dict[str, int | None] = {}  # device -> the seq of its latest drive
        self.trackers: dict[tuple[str, int | None], rows.DriveProgress] = {}
        self.started: dict[tuple[str, int | None], float] = {}
        self.done: set[tuple[str, int | None]] = set()

    def handle(self, event: events.WatchEvent, slot: str | None) -> None:
        now = self.clock()
        match event:
            case events.DriveAdded(device=device, eligible=True, info=info):
                info = info or events.DriveInfo()
                key = (device, info.seq)
                self.current[device] = info.seq
                self.trackers[key] = rows.DriveProgress(verifies=self.verify)
                self.started[key] = self.journal.clock()
                self.rows[key] = self.journal.start(slot or "", {
                    "seq": info.seq, "device": device, "port_path": info.port_path or "",
                    "vendor": info.vendor, "model": info.model, "serial": info.serial,
                    "capacity": info.size or None, "image": self.image.rsplit("/", 1)[-1],
                    "image_sha256": self.sha256})
            case events.Phase(device=str(device), phase=phase) \
                    if self._key(device, event.seq) in self.trackers:
                if phase not in (events.Step.DONE, events.Step.FAILED):
                    self.trackers[self._key(device, event.seq)].on_phase(phase, now)
            case events.Progress(device=str(device), phase=phase, done=done, total=total) \
                    if self._key(device, event.seq) in self.trackers:
                self.trackers[self._key(device, event.seq)].on_progress(phase, done, total,
                                                                        now)
            case events.Result(result=r):
                self._finish(r, now)
            case events.Summary(results=results):
                for r in results:  # ended without a result event (cancelled early)
                    self._finish(r, now)

    def _key(self, device: str, seq: int | None) -> tuple[str, int | None]:
        """A phase's or progress's drive: its seq when it carries one (a late event of a
        drive pulled, its name another one's now), else the name's latest drive."""
        return (device, seq if seq is not None else self.current.get(device))

    def _finish(self, r: events.DriveResult, now: float) -> None:
        key = (r.device, r.drive.seq if r.drive is not None else self.current.get(r.device))
        row = self.rows.get(key)
        if key in self.done or row is None:
            return
        tracker = self.trackers.pop(key)
        tracker.on_result(r, now, elapsed=False)
        data = record(r, tracker, image=self.image, sha256=self.sha256,
                      started=self.started.pop(key, None), ended=self.journal.clock())
        self.journal.finish(row, data)
        self.done.add(key)
        del self.rows[key]
