"""What the page shows: one tile per slot, the batch's counters, the image.  Pure code.

Fed ``(event, slot, now)`` on the server's loop; :meth:`Board.snapshot` is the JSON of
``GET /api/slots`` and of each message the page receives.  A tile's ``state`` is one word
(the page also draws it as a shape and a text, never as a colour alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from popsicle_py import events, rows
from popsicle_py.events import JsonObject
from popsicle_py.identity import MediaIdentity

#: The states a slot can be in, in the order a drive goes through them.
STATES = ("empty", "probing", "writing", "verifying", "done", "failed", "stopped", "ignored")
_PHASE_STATE = {"probing": "probing", "writing": "writing", "syncing": "writing",
                "verifying": "verifying"}


@dataclass
class Tile:
    label: str
    state: str = "empty"
    device: str | None = None
    seq: int | None = None  # the drive's, told apart from another one of the same name
    drive: JsonObject | None = None
    why: str | None = None  # failed, stopped or ignored: the reason a person reads
    cause: str | None = None
    powered_off: bool = False
    identify: bool = False
    tracker: rows.DriveProgress | None = None
    write_speed: float | None = None
    verify_speed: float | None = None
    #: The medium as it was when the drive came (not shown): identify reads no other one.
    identity: MediaIdentity | None = None

    def to_json(self, now: float) -> JsonObject:
        t = self.tracker
        fraction = t.fraction if t is not None else None
        if self.state == "done":
            fraction = 1.0
        return {"label": self.label, "state": self.state, "device": self.device,
                "drive": self.drive, "why": self.why, "cause": self.cause,
                "powered_off": self.powered_off, "identify": self.identify,
                "progress": None if fraction is None else round(fraction, 4),
                "speed": _round(t.speed(now)) if t is not None and self.busy else None,
                "eta": _round(t.eta(now)) if t is not None and self.busy else None}

    @property
    def busy(self) -> bool:
        return self.state in ("probing", "writing", "verifying")


def _same(tile: Tile, seq: int | None) -> bool:
    """Whether an event of the tile's device name is about its drive: the same seq, when
    both are known (the kernel gives a name again at once: a late event of a drive pulled
    out belongs to no other drive's tile)."""
    return seq is None or tile.seq is None or seq == tile.seq


def _shows(tile: Tile, r: events.DriveResult) -> bool:
    """Whether the tile shows the drive that ended: the same device name and seq."""
    return r.device == tile.device and _same(tile, r.drive.seq if r.drive is not None
                                             else None)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass
class Board:
    """Every slot's tile (the map's, in its order; without a map, as drives come)."""

    image: JsonObject
    station: JsonObject
    target: int | None = None
    counters: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0,
                                                              "total": 0})
    tiles: dict[str, Tile] = field(default_factory=dict)
    others: list[JsonObject] = field(default_factory=list)  # unmapped or unslotted drives
    stopping: bool = False
    ended: bool = False
    version: int = 0
    bytes_written: int = 0
    results: dict[str, int] = field(default_factory=dict)  # per status, this session
    verify: bool = True

    @classmethod
    def with_slots(cls, labels: tuple[str, ...], **kwargs: Any) -> Board:
        board = cls(**kwargs)
        for label in labels:
            board.tiles[label] = Tile(label)
        return board

    def tile(self, label: str) -> Tile:
        if label not in self.tiles:
            self.tiles[label] = Tile(label)
        return self.tiles[label]

    def apply(self, event: events.WatchEvent, slot: str | None, now: float,
              identity: MediaIdentity | None = None) -> None:
        """One event about ``slot``; ``identity``: a ``drive_added``'s medium, as it came."""
        self.version += 1
        if slot is None:
            self._unslotted(event)
            return
        tile = self.tile(slot)
        match event:
            case events.DriveAdded(eligible=False) if tile.busy:
                self._unslotted(event)  # refused beside the slot's drive: the tile keeps it
            case events.DriveAdded(device=device, eligible=eligible, reason=reason, info=info):
                tile.device, tile.seq = device, info.seq if info is not None else None
                tile.identity = identity
                tile.drive = info.to_json() if info is not None else None
                tile.why, tile.cause, tile.powered_off = None, None, False
                tile.state = "probing" if eligible else "ignored"
                tile.tracker = rows.DriveProgress(verifies=self.verify) if eligible else None
                if not eligible:
                    tile.why = reason
            case events.Phase(device=device, phase=phase, seq=seq) \
                    if device == tile.device and _same(tile, seq):
                if phase in _PHASE_STATE and tile.tracker is not None:
                    tile.state = _PHASE_STATE[phase]
                    tile.tracker.on_phase(phase, now)
                elif phase == "done" and event.detail == events.POWERED_OFF:
                    tile.powered_off = True
            case events.Progress(device=device, phase=phase, done=done, total=total, seq=seq) \
                    if device == tile.device and _same(tile, seq) and tile.tracker is not None:
                tile.tracker.on_progress(phase, done, total, now)
            case events.Result(result=r) if _shows(tile, r):
                self._ended(tile, r, now)
            case events.Result(result=r):  # a drive the tile no longer shows: still counted
                self._count(r)
            case events.DriveRemoved(device=device) if device == tile.device:
                if tile.busy:  # pulled too early: its result (failed, and why) follows
                    tile.why = "the drive was pulled out"
                elif tile.powered_off:
                    pass  # powering off removes the disk, the stick stays: "done: pull me"
                else:
                    self.tiles[tile.label] = Tile(tile.label, identify=tile.identify)
            case events.DriveRemoved():
                self._unslotted(event)

    def _count(self, r: events.DriveResult) -> None:
        self.bytes_written += r.bytes_written
        self.results[r.status] = self.results.get(r.status, 0) + 1
        if r.status != events.Status.CANCELLED:  # a drive stopped is neither
            self.counters["ok" if r.ok else "failed"] += 1
            self.counters["total"] += 1

    def _ended(self, tile: Tile, r: events.DriveResult, now: float) -> None:
        self._count(r)
        if tile.tracker is not None:
            tile.tracker.on_result(r, now, elapsed=False)
            tile.write_speed = tile.tracker.write_speed
            tile.verify_speed = tile.tracker.verify_speed
        if r.ok:  # done, but an operator who asked for certificates is told of a missing one
            tile.state = "done"
            tile.why = (None if r.certificate_error is None
                        else f"no certificate: {r.certificate_error}")
        elif r.status == events.Status.CANCELLED:
            tile.state, tile.why, tile.cause = "stopped", r.error, str(r.cause or "cancelled")
        else:
            tile.state, tile.why, tile.cause = "failed", r.error, str(r.cause or "error")

    def _unslotted(self, event: events.WatchEvent) -> None:
        """A drive on no slot (an unmapped port): announced, never opened."""
        match event:
            case events.DriveAdded(device=device, reason=reason, info=info):
                self.others = [o for o in self.others if o["device"] != device][-9:]
                self.others.append({"device": device, "why": reason,
                                    "port": info.port_path if info else None,
                                    "drive": info.to_json() if info else None})
            case events.DriveRemoved(device=device):
                self.others = [o for o in self.others if o["device"] != device]
            case events.Summary():
                self.ended = True

    def snapshot(self, now: float) -> JsonObject:
        in_flight = sum(1 for t in self.tiles.values() if t.busy)
        return {"version": self.version, "station": self.station, "image": self.image,
                "counters": {**self.counters, "in_flight": in_flight, "target": self.target},
                "stopping": self.stopping, "ended": self.ended,
                "slots": [t.to_json(now) for t in self.tiles.values()],
                "others": list(self.others)}
