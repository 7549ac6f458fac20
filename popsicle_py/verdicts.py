"""What a drive's result and a run's summary say, in the words a person reads.

Shared by the views (plain lines, the live rows' table, the duplicator screen); plain functions
over the result events.  ``ok_words`` is honest about what was checked: verified from the
device, or only written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from popsicle_py import events, progress, rows
from popsicle_py.units import format_size


def extras(r: events.DriveResult) -> str:
    """What a result says beyond its status: bytes skipped, buckets repaired, no certificate."""
    parts = []
    if r.bytes_skipped:
        parts.append(f"{format_size(r.bytes_skipped)} already there")
    if r.bytes_unused:
        parts.append(f"{format_size(r.bytes_unused)} of free space not written")
    if r.repaired:
        parts.append(f"repaired {r.repaired} bucket{'s' if r.repaired != 1 else ''}")
    if r.certificate_error is not None:
        parts.append(f"no certificate: {r.certificate_error}")
    return "".join(f", {p}" for p in parts)


def ok_words(r: events.DriveResult) -> str:
    """What an ok result means, honestly: verified from the device, or only written."""
    if not r.bytes_written and not r.bytes_skipped:
        return "matches the image" if r.verified else "nothing to write"
    return "written and verified" if r.verified else "written (not verified)"


def identity(r: events.DriveResult) -> str:
    """`` [#2, port 1-1.2, serial 4C53...]``: which stick, when the job was told."""
    d = r.drive
    if d is None or not (d.port_path or d.serial):  # a loop device: its name says it all
        return ""
    parts = [f"#{d.seq}" if d.seq is not None else "",
             f"port {d.port_path}" if d.port_path else "",
             f"serial {d.serial}" if d.serial else ""]
    shown = ", ".join(p for p in parts if p)
    return f" [{shown}]" if shown else ""


def result_line(r: events.DriveResult, speeds: str = "") -> str:
    if r.ok:
        flashed = r.bytes_written or r.bytes_skipped
        what = ok_words(r)
        if flashed:
            what = f"{format_size(r.bytes_written)} {what}"
        return f"{r.device}: ok ({what}{extras(r)}{speeds}){identity(r)}"
    why = strip_device(r.error, r.device)
    said = f": {why}" if why and why != r.status else ""  # not "cancelled: cancelled"
    if why and why.startswith((f"{r.status} ", f"{r.status};")):  # "cancelled while ..."
        said = why[len(r.status):]
    return f"{r.device}: {r.status}{said}{identity(r)}"


def read_line(r: events.DriveResult, tracker: progress.DriveProgress) -> str:
    """``read``'s ok result: the drive was read into a file, not written."""
    speed = f", {rows.format_speed(tracker.verify_speed)}" if tracker.verify_speed else ""
    return f"{r.device}: ok ({format_size(r.bytes_written)} read{speed}){identity(r)}"


def strip_device(text: str | None, device: str) -> str | None:
    if text and text.startswith(device + ": "):
        return text[len(device) + 2 :]
    return text


def summary_line(summary: events.Summary, *, names: bool = True) -> str:
    """The run in one line; with ``names``, the drives that did not end ok and why."""
    good = sum(r.ok for r in summary.results)
    total = len(summary.results)
    if not total:
        return "cancelled: no drive was written" if summary.cancelled else "no drive was written"
    if summary.ok:
        return f"done: {good} of {total} drives ok"
    said = f"cancelled: {good} of {total} drives ok" if summary.cancelled \
        else f"finished with problems: {good} of {total} drives ok"
    return (f"{said}; {not_ok(summary)}" if names and (good < total or summary.uncertified)
            else said)


#: How many drives the last line names; the table (or the result lines) has the others.
NAMED = 8
_CAUSE_WORDS = {events.Cause.IO_ERROR: "I/O error", events.Cause.NO_SPACE: "no space left",
                events.Cause.READ_ONLY: "read-only", events.Cause.SOURCE: "the image failed"}


def cause_words(r: events.DriveResult) -> str:
    """A few words for why a drive is not ok: ``failed (no space left)``."""
    if r.status == events.Status.CANCELLED or r.cause is None:
        return str(r.status)
    if r.cause is events.Cause.SOURCE and (r.error or "").startswith(f"{r.device} changed "):
        return f"{r.status} (changed while it was read)"  # read's drive: no image to blame
    why = _CAUSE_WORDS.get(r.cause, r.cause.value.replace("-", " "))
    return f"{r.status} ({why})"


def not_ok(summary: events.Summary) -> str:
    """``not ok: #3 /dev/sdd failed (no space left), /dev/sde invalid (counterfeit)``, and
    ``no certificate: /dev/sdf`` for ok drives whose certificate could not be written."""
    bad = [r for r in summary.results if not r.ok]
    said = [f"not ok: {_named(bad, lambda r: f' {cause_words(r)}')}"] if bad else []
    if summary.uncertified:
        said.append(f"no certificate: {_named(summary.uncertified, lambda r: '')}")
    return "; ".join(said)


def _named(results: Sequence[events.DriveResult],
           words: Callable[[events.DriveResult], str]) -> str:
    named = [f"{'' if r.drive is None or r.drive.seq is None else f'#{r.drive.seq} '}"
             f"{r.device}{words(r)}" for r in results[:NAMED]]
    more = f" and {len(results) - NAMED} more" if len(results) > NAMED else ""
    return f"{', '.join(named)}{more}"


def speeds(tracker: progress.DriveProgress | None) -> str:
    if tracker is None:
        return ""
    parts = [f"write {rows.format_speed(tracker.write_speed)}" if tracker.write_speed else "",
             f"verify {rows.format_speed(tracker.verify_speed)}" if tracker.verify_speed
             else ""]
    return "".join(f", {p}" for p in parts if p)
