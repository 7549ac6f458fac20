"""What a flash tells its views: small frozen dataclasses, one per kind of news.

The flow is one way: the job emits these, a view (Rich, plain lines or JSON) renders them.
``to_json`` gives each event's JSON object; the README and man page document the schema.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Phases a drive goes through, in order; a drive ends in one of the STATUSES.
PHASES = ("checksum", "writing", "syncing", "verifying", "done", "failed")
STATUSES = ("ok", "failed", "invalid", "cancelled")


@dataclass(frozen=True)
class DriveInfo:
    """Which physical drive an event is about: the kernel reuses /dev names, sticks share serials.

    ``seq`` numbers the drives of one run from 1 (in ``watch``, in the order they started);
    ``port_path`` is the USB port the drive hangs off (``1-1.2``: bus 1, port 1, hub port 2),
    None when it is not on USB.  Together they tell two results apart for good.
    """

    seq: int | None = None
    port_path: str | None = None
    vendor: str = ""
    model: str = ""
    serial: str = ""
    size: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Started:
    """The run begins: what is written where."""

    image: str
    format: str
    size: int | None
    devices: tuple[str, ...]
    labels: tuple[str, ...] = ()
    verify: bool = True
    #: One per device, in the same order, when the job was told who they are.
    drives: tuple[DriveInfo, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"event": "start", "image": self.image, "format": self.format,
                "size": self.size, "devices": list(self.devices), "verify": self.verify,
                "drives": [d.to_json() for d in self.drives]}


@dataclass(frozen=True)
class Note:
    """Something the user should read that is not about one drive's progress."""

    text: str

    def to_json(self) -> dict[str, Any]:
        return {"event": "note", "text": self.text}


@dataclass(frozen=True)
class Phase:
    """A drive (or, with ``device`` None, the image: checksum) entered a new phase."""

    device: str | None
    phase: str
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"event": "phase", "device": self.device, "phase": self.phase,
                "detail": self.detail}


@dataclass(frozen=True)
class Progress:
    """Bytes done of ``total`` (None when unknown) in a drive's current phase."""

    device: str | None
    phase: str
    done: int
    total: int | None

    def to_json(self) -> dict[str, Any]:
        return {"event": "progress", "device": self.device, "phase": self.phase,
                "bytes": self.done, "total": self.total}


@dataclass(frozen=True)
class DriveResult:
    """How one drive ended.  ``status`` is one of :data:`STATUSES`."""

    device: str
    status: str
    bytes_written: int
    error: str | None = None
    mismatch_offset: int | None = None
    elapsed: float | None = None
    bytes_skipped: int = 0
    repaired: int = 0  # buckets rewritten after verification found them bad
    #: Read back from the device and found equal to the image (False: --no-verify, or not ok).
    verified: bool = False
    drive: DriveInfo | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.elapsed is not None:
            data["elapsed"] = round(self.elapsed, 3)
        return data


@dataclass(frozen=True)
class Result:
    """A drive's result, as an event."""

    result: DriveResult

    def to_json(self) -> dict[str, Any]:
        return {"event": "result", **self.result.to_json()}


@dataclass(frozen=True)
class Summary:
    """The last event of every run."""

    results: tuple[DriveResult, ...] = field(default_factory=tuple)
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results) and not self.cancelled

    def to_json(self) -> dict[str, Any]:
        return {"event": "summary", "ok": self.ok,
                "results": [r.to_json() for r in self.results]}


Event = Started | Note | Phase | Progress | Result | Summary


# ----------------------------------------------------------------------------------------------
# Duplicator mode (``popsicle-py watch``)

#: The detail of the second ``done`` phase a watched drive gets once it has been powered off.
POWERED_OFF = "powered off"


@dataclass(frozen=True)
class Watching:
    """The udev monitor is listening: drives plugged in from now on are seen."""

    def to_json(self) -> dict[str, Any]:
        return {"event": "watching"}


@dataclass(frozen=True)
class DriveAdded:
    """A whole disk appeared; ``eligible`` says whether it will be written, ``reason`` why not."""

    device: str
    label: str
    size: int
    eligible: bool
    reason: str | None = None
    info: DriveInfo | None = None

    def to_json(self) -> dict[str, Any]:
        return {"event": "drive_added", "device": self.device, "label": self.label,
                "size": self.size, "eligible": self.eligible, "reason": self.reason,
                "drive": None if self.info is None else self.info.to_json()}


@dataclass(frozen=True)
class DriveRemoved:
    """A disk seen in this session went away (pulled, or powered off once done)."""

    device: str

    def to_json(self) -> dict[str, Any]:
        return {"event": "drive_removed", "device": self.device}


WatchEvent = Event | Watching | DriveAdded | DriveRemoved
