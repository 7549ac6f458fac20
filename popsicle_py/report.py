"""``--report FILE``: one record per drive, appended and fsynced as each drive ends.

A duplicator station's log: which port, which stick, how fast, what was verified.  The report
is a sink fed the same events as the views; it writes a record at each drive's result, so a
crash (or a power cut) loses nothing already finished.  The format follows the extension:
``.csv`` (a header line when the file is new or empty) or ``.jsonl``/``.json`` (JSON Lines,
one object per line).  An existing file is appended to, never truncated.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone

from popsicle_py import events, files, progress

#: The columns of a record, in order (CSV header, JSON keys).
FIELDS = ("seq", "device", "port_path", "vendor", "model", "serial", "capacity", "image",
          "image_sha256", "bytes_written", "bytes_skipped", "write_speed", "verify_speed",
          "result", "verified", "first_bad_offset", "error", "started", "ended", "link_speed",
          "device_sha256", "customized")

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


class ReportError(Exception):
    """The report file cannot be used; one line for the user (exit 2, nothing written)."""


def report_format(path: str) -> str:
    """``csv`` or ``jsonl`` from the file's extension; ReportError for any other."""
    fmt = FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise ReportError(f"--report {path}: the name must end in .csv, .jsonl or .json "
                          "(the extension picks the format)")
    return fmt


def iso(wall: float) -> str:
    """ISO 8601 in UTC, to the second: ``2026-12-01T13:05:09Z``."""
    return datetime.fromtimestamp(wall, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def record(result: events.DriveResult, tracker: progress.DriveProgress | None, *, image: str,
           sha256: str, started: float | None, ended: float) -> events.JsonObject:
    """One drive's record (plain data): its identity, what was written, speeds, the verdict."""
    info = result.drive or events.DriveInfo()
    return {
        "seq": info.seq, "device": result.device, "port_path": info.port_path or "",
        "vendor": info.vendor, "model": info.model, "serial": info.serial,
        "capacity": info.size or None, "image": os.path.basename(image),
        "image_sha256": sha256, "bytes_written": result.bytes_written,
        "bytes_skipped": result.bytes_skipped + result.bytes_unused,  # free space: not written
        "write_speed": _per_second(tracker.write_speed if tracker else None),
        "verify_speed": _per_second(tracker.verify_speed if tracker else None),
        "result": result.status, "verified": result.verified,
        "first_bad_offset": result.mismatch_offset, "error": result.error or "",
        "started": iso(started if started is not None else ended), "ended": iso(ended),
        "link_speed": info.link_speed, "device_sha256": result.device_sha256 or "",
        "customized": result.customized,  # --customize: values (secrets redacted), digest
    }


def _per_second(speed: float | None) -> int | None:
    """Whole bytes per second, or None when the phase did not run."""
    return None if speed is None else round(speed)


def format_record(data: events.JsonObject, fmt: str) -> str:
    if fmt == "jsonl":
        return json.dumps({k: data[k] for k in FIELDS}) + "\n"
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(
        ["" if data[k] is None else str(data[k]).lower() if isinstance(data[k], bool)
         else json.dumps(data[k], sort_keys=True) if isinstance(data[k], dict)
         else csv_cell(data[k]) for k in FIELDS])
    return buf.getvalue()


#: What a spreadsheet takes for the start of a formula in a cell of a CSV file it opens.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """``value`` for a CSV cell: a text that a spreadsheet would run as a formula gets a
    leading ``'`` (shown, not run). A stick's model and serial are the stick's own words:
    one named ``=HYPERLINK(...)`` must not act in the sheet of whoever opens the report."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


class Report:
    """Consumes a run's events and appends a record per drive result, fsynced at once.

    Opened before anything is written, so an unusable path refuses the run (exit 2).  A
    write that fails later (disk full) is said once on ``warn`` and never fails a drive.
    """

    def __init__(self, path: str, *, image: str, sha256: str = "",
                 warn: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.path, self.fmt = path, report_format(path)
        self.image, self.sha256 = image, sha256
        self.warn = warn or (lambda line: None)
        self.clock = clock
        try:
            self.fd = files.open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            empty = os.fstat(self.fd).st_size == 0
        except OSError as exc:
            raise ReportError(f"--report {path}: {exc.strerror or exc}") from None
        self.failed = False
        self.failed_why = ""
        if self.fmt == "csv" and empty:
            self._append(",".join(FIELDS) + "\n", quiet=True)  # a refusal follows, not a note
            if self.failed:  # nothing is written yet: refuse rather than run without it
                os.close(self.fd)
                raise ReportError(f"--report {path}: cannot write to it: {self.failed_why}")
        self.trackers: dict[str, progress.DriveProgress] = {}
        self.started: dict[str, float] = {}
        self.recorded: set[tuple[str, int | None]] = set()
        self.verify = True

    def _tracker(self, device: str) -> progress.DriveProgress:
        if device not in self.trackers:
            self.trackers[device] = progress.DriveProgress(verifies=self.verify)
        return self.trackers[device]

    def handle(self, event: events.WatchEvent) -> None:
        now = time.monotonic()
        match event:
            case events.Started(verify=verify, devices=devices):
                self.verify = verify
                for device in devices:
                    self._tracker(device)
            case events.DriveAdded(device=device, eligible=True):
                self.trackers[device] = progress.DriveProgress(verifies=self.verify)  # a new stick
                self.started.pop(device, None)
            case events.Phase(device=str(device), phase=phase):
                if phase not in ("done", "failed"):
                    self.started.setdefault(device, self.clock())
                    self._tracker(device).on_phase(phase, now)
            case events.Progress(device=str(device), phase=phase, done=done, total=total):
                self._tracker(device).on_progress(phase, done, total, now)
            case events.Result(result=r):
                self._record(r, now)
            case events.Summary(results=results):
                for r in results:  # a drive ended without a result event (cancelled early)
                    if _key(r) not in self.recorded:
                        self._record(r, now)

    def _record(self, r: events.DriveResult, now: float) -> None:
        tracker = self._tracker(r.device)
        tracker.on_result(r, now, elapsed=False)
        data = record(r, tracker, image=self.image, sha256=self.sha256,
                      started=self.started.pop(r.device, None), ended=self.clock())
        self._append(format_record(data, self.fmt))
        self.recorded.add(_key(r))
        del self.trackers[r.device]

    def _append(self, text: str, *, quiet: bool = False) -> None:
        """Append one record whole, or nothing: a record cut short by a full disk is cut off
        again (else the next run's first record would be glued to its half)."""
        if self.failed:
            return
        end, written, data = None, 0, text.encode()
        whole = len(data)
        try:
            end = os.fstat(self.fd).st_size
            while data:
                done = os.write(self.fd, data)
                written, data = written + done, data[done:]
            os.fsync(self.fd)
        except OSError as exc:
            with contextlib.suppress(OSError):  # only when no one appended after it
                if end is not None and 0 < written < whole \
                        and os.fstat(self.fd).st_size == end + written:
                    os.ftruncate(self.fd, end)
            self.failed = True
            self.failed_why = exc.strerror or str(exc)
            if not quiet:
                self.warn(f"--report {self.path}: cannot write the report: "
                          f"{exc.strerror or exc}; the drives go on")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _key(r: events.DriveResult) -> tuple[str, int | None]:
    """A drive of this run: its name and number (a name alone is reused in ``watch``)."""
    return r.device, r.drive.seq if r.drive is not None else None


def fan_out(*sinks: Callable[[events.WatchEvent], None]
            ) -> Callable[[events.WatchEvent], None]:
    """One emit that feeds every sink, in order: the report first, so that a result a person
    or a script has seen is already on disk."""

    def emit(event: events.WatchEvent) -> None:
        for sink in sinks:
            sink(event)

    return emit
