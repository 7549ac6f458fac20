"""What a flash tells its views: small frozen dataclasses, one per kind of news.

The flow is one way: the job emits these, a view (Rich, plain lines or JSON) renders them.
``to_json`` gives each event's JSON object; the README and man page document the schema.
"""

from __future__ import annotations

from dataclasses import asdict, field
from enum import Enum
from typing import Any

from popsicle_py.records import record

#: A JSON object as ``to_json`` gives it: the values are whatever JSON holds.
JsonObject = dict[str, Any]


class _Word(str, Enum):
    """A typed value that is also the plain word the JSON and the views show."""

    __str__ = str.__str__
    __format__ = str.__format__  # type: ignore[assignment]


class Step(_Word):
    """The phases a drive (or, for the first four, the image) goes through."""

    CHECKSUM = "checksum"  # the image's checksum, before writing
    DOWNLOADING = "downloading"  # an image from a URL
    DECOMPRESSING = "decompressing"  # watch: the image decompressed once
    PROBING = "probing"  # the drive's real capacity, before writing
    READING = "reading"  # read: the drive read into an image file
    ERASING = "erasing"  # erase: signatures wiped, partitioned, formatted
    WRITING = "writing"
    SYNCING = "syncing"  # the image's head (its first MiB), written last
    VERIFYING = "verifying"
    DONE = "done"
    FAILED = "failed"


class Status(_Word):
    """How a drive ended."""

    OK = "ok"
    FAILED = "failed"
    INVALID = "invalid"  # written, but it does not read back as the image
    CANCELLED = "cancelled"
    REJECTED = "rejected"  # graded out: too slow, outside the capacity asked for, bad surface


class Cause(_Word):
    """Why a drive did not end ok: for programs (the message says it for people)."""

    REMOVED = "removed"
    STALLED = "stalled"
    COUNTERFEIT = "counterfeit"
    MISMATCH = "mismatch"  # verification found other bytes
    IO_ERROR = "io-error"
    NO_SPACE = "no-space"
    TOO_SMALL = "too-small"
    READ_ONLY = "read-only"
    BUSY = "busy"
    PERMISSION = "permission"
    NO_MEDIUM = "no-medium"
    NOT_FOUND = "not-found"
    CHANGED = "changed"  # not the drive that was confirmed
    SOURCE = "source"  # the image could not be read, or changed while read
    CANCELLED = "cancelled"
    SLOW = "slow"  # rejected: below --min-write-speed or --min-read-speed
    CAPACITY = "capacity"  # rejected: outside --capacity and --tolerance
    SURFACE = "surface"  # rejected: --surface-test found a bad region
    INTERNAL = "internal"
    ERROR = "error"


# Kept for readers of the first API: the words, in order.
PHASES = tuple(s.value for s in Step)
STATUSES = tuple(s.value for s in Status)
CAUSES = tuple(c.value for c in Cause)


@record
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
    #: The USB link's speed in Mbit/s (12, 480, 5000, 10000 ...), None when not on USB.
    link_speed: int | None = None

    def to_json(self) -> JsonObject:
        return asdict(self)


@record
class Started:
    """The run begins: what is written where."""

    image: str
    format: str
    size: int | None
    devices: tuple[str, ...]
    verify: bool = True
    #: One per device, in the same order, when the job was told who they are.
    drives: tuple[DriveInfo, ...] = ()

    def to_json(self) -> JsonObject:
        return {"event": "start", "image": self.image, "format": self.format,
                "size": self.size, "devices": list(self.devices), "verify": self.verify,
                "drives": [d.to_json() for d in self.drives]}


@record
class Note:
    """Something the user should read that is not about one drive's progress."""

    text: str

    def to_json(self) -> JsonObject:
        return {"event": "note", "text": self.text}


@record
class Error:
    """A problem that ended the run before any drive was written (one line each)."""

    message: str

    def to_json(self) -> JsonObject:
        return {"event": "error", "message": self.message}


@record
class Phase:
    """A drive (or, with ``device`` None, the image: checksum) entered a new phase."""

    device: str | None
    phase: Step
    detail: str | None = None
    #: With the ``failed`` phase: why, as a typed value (the detail says it for people).
    cause: Cause | None = None
    #: ``watch``: the drive's :attr:`DriveInfo.seq`, which tells it apart from the next drive
    #: given its /dev name while it is still ending.  Not in the JSON (its order does that).
    seq: int | None = None

    def to_json(self) -> JsonObject:
        data = {"event": "phase", "device": self.device, "phase": self.phase,
                "detail": self.detail}
        if self.cause is not None:
            data["cause"] = self.cause
        return data


@record
class Progress:
    """Bytes done of ``total`` (None when unknown) in a drive's current phase."""

    device: str | None
    phase: Step
    done: int
    total: int | None
    #: ``watch``: the drive's seq, as :attr:`Phase.seq` (not in the JSON).
    seq: int | None = None

    def to_json(self) -> JsonObject:
        return {"event": "progress", "device": self.device, "phase": self.phase,
                "bytes": self.done, "total": self.total}


@record
class DriveResult:
    """How one drive ended.  ``status`` is one of :data:`STATUSES`."""

    device: str
    status: Status
    bytes_written: int
    error: str | None = None
    mismatch_offset: int | None = None
    elapsed: float | None = None
    bytes_skipped: int = 0
    repaired: int = 0  # buckets rewritten after verification found them bad
    cause: Cause | None = None  # why it is not ok (None when ok)
    #: Read back from the device and found equal to the image (False: --no-verify, or not ok).
    verified: bool = False
    drive: DriveInfo | None = None
    #: The first-boot settings written (--customize): format, values with secrets redacted,
    #: file names and their SHA-256; None without --customize or when the drive is not ok.
    customized: JsonObject | None = None
    #: SHA-256 (hex) of the image's range as read back from the drive in the verify pass.
    device_sha256: str | None = None
    #: Bytes of the image in its file systems' free space: neither written nor verified.
    bytes_unused: int = 0
    #: Seconds an ok drive spent writing (its head included) and reading back, timed by the
    #: engine on the drive's own thread: the speeds shown are bytes over these.
    write_seconds: float | None = None
    verify_seconds: float | None = None
    #: With --certificate: the path of an ok drive's certificate, or why it has none (the
    #: drive stays ok, the run does not: see :attr:`Summary.ok`).
    certificate: str | None = None
    certificate_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> JsonObject:
        data = asdict(self)
        if self.elapsed is not None:
            data["elapsed"] = round(self.elapsed, 3)
        for key in ("write_seconds", "verify_seconds"):  # a fast drive's pass: milliseconds
            if data[key] is not None:
                data[key] = round(data[key], 4)
        return data


@record
class Probed:
    """A drive's capacity probe ended: what it claims, about what it holds."""

    device: str
    claimed: int
    real_estimate: int | None
    ok: bool
    message: str
    elapsed: float = 0.0

    def to_json(self) -> JsonObject:
        return {"event": "probe", "device": self.device, "claimed": self.claimed,
                "real_estimate": self.real_estimate, "ok": self.ok, "message": self.message,
                "elapsed": round(self.elapsed, 3)}


@record
class Result:
    """A drive's result, as an event."""

    result: DriveResult

    def to_json(self) -> JsonObject:
        return {"event": "result", **self.result.to_json()}


@record
class Summary:
    """The last event of every run."""

    results: tuple[DriveResult, ...] = field(default_factory=tuple)
    cancelled: bool = False
    #: A watch session: ending with no drive at all is ok (exit 0), as a refused flash is not.
    none_is_ok: bool = False

    @property
    def ok(self) -> bool:
        """Every drive ok and, when certificates were asked for, certified."""
        return ((bool(self.results) or self.none_is_ok) and all(r.ok for r in self.results)
                and not self.uncertified and not self.cancelled)

    @property
    def uncertified(self) -> tuple[DriveResult, ...]:
        """The ok drives whose certificate, asked for, could not be written."""
        return tuple(r for r in self.results if r.ok and r.certificate_error is not None)

    def to_json(self) -> JsonObject:
        return {"event": "summary", "ok": self.ok,
                "results": [r.to_json() for r in self.results]}


class Fetch(_Word):
    """What a download (an image at a URL) is doing, beyond its bytes (``Progress``)."""

    RESUMING = "resuming"  # the connection dropped or stalled: asking again from ``received``
    FAILED = "failed"  # given up: ``detail`` says why (the drives fail with cause ``source``)
    COMPLETE = "complete"  # every byte arrived (and, when ``checked``, the checksum matched)


@record
class Download:
    """The image's download changed course: resuming after a drop, failed, or complete.

    ``checked`` is true only once a published or given checksum matched the whole body.
    """

    state: Fetch
    received: int
    total: int | None
    detail: str | None = None
    checked: bool = False

    def to_json(self) -> JsonObject:
        return {"event": "download", "state": self.state, "bytes": self.received,
                "total": self.total, "detail": self.detail, "checked": self.checked}


Event = Started | Note | Error | Phase | Progress | Download | Probed | Result | Summary


# ----------------------------------------------------------------------------------------------
# Duplicator mode (``popsicle-py watch``)

#: The detail of the second ``done`` phase a watched drive gets once it has been powered off.
POWERED_OFF = "powered off"


@record
class Watching:
    """The udev monitor is listening: drives plugged in from now on are seen."""

    def to_json(self) -> JsonObject:
        return {"event": "watching"}


@record
class DriveAdded:
    """A whole disk appeared; ``eligible`` says whether it will be written, ``reason`` why not."""

    device: str
    label: str
    size: int
    eligible: bool
    reason: str | None = None
    info: DriveInfo | None = None

    def to_json(self) -> JsonObject:
        return {"event": "drive_added", "device": self.device, "label": self.label,
                "size": self.size, "eligible": self.eligible, "reason": self.reason,
                "drive": None if self.info is None else self.info.to_json()}


@record
class DriveRemoved:
    """A disk seen in this session went away (pulled, or powered off once done)."""

    device: str

    def to_json(self) -> JsonObject:
        return {"event": "drive_removed", "device": self.device}


WatchEvent = Event | Watching | DriveAdded | DriveRemoved
