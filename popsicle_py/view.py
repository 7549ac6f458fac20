"""Views: render a job's events for a terminal (Rich), for a log (plain lines) or for a script.

A view only renders; it decides nothing about drives.  Each has ``handle(event)`` and
``close()``; the CLI picks one from the output's nature and the user's flags.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import IO

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.text import Text

from popsicle_py import events, live, progress, verdicts
from popsicle_py.signals import say_on_stderr
from popsicle_py.units import format_size
from popsicle_py.verdicts import ok_words as ok_words  # its old home: callers import it here
from popsicle_py.view_json import JSON_INTERVAL as JSON_INTERVAL  # re-exported: its old home
from popsicle_py.view_json import JsonView as JsonView
from popsicle_py.view_json import Out as Out
from popsicle_py.view_json import printable
from popsicle_py.view_json import write_out as write_out

#: Plain output prints a drive's progress at most this often.
PLAIN_INTERVAL = 5.0


class PlainView:
    """For logs and pipes: a line per state change, a progress line every few seconds."""

    def __init__(self, out: IO[str] | None = None, interval: float = PLAIN_INTERVAL) -> None:
        self.out = Out(out)
        self.interval = interval
        self._last: dict[str | None, float] = {}
        self._trackers: dict[str, progress.DriveProgress] = {}  # for the average speeds
        self._probed: dict[str, str] = {}  # a probe's verdict, said once

    def _line(self, text: str, *, droppable: bool = False) -> None:
        """One line, whatever a name in it holds; ``droppable`` while the reader is behind."""
        self.out.write(printable(text) + "\n", droppable=droppable)

    def _track(self, event: events.WatchEvent) -> None:
        now = time.monotonic()
        match event:
            case events.DriveAdded(device=device):
                self._trackers.pop(device, None)
            case events.Phase(device=str(device), phase=phase) if phase not in ("done",
                                                                                 "failed"):
                self._trackers.setdefault(device, progress.DriveProgress()).on_phase(phase, now)
            case events.Progress(device=str(device), phase=phase, done=done, total=total):
                self._trackers.setdefault(device, progress.DriveProgress()).on_progress(
                    phase, done, total, now)
            case events.Result(result=r) if r.device in self._trackers:
                self._trackers[r.device].on_result(r, now, elapsed=False)

    def handle(self, event: events.WatchEvent) -> None:
        self._track(event)
        match event:
            case events.Started(image=image, size=size, devices=devices):
                self._line(f"image {image} ({format_size(size)}) -> {', '.join(devices)}")
            case events.Note(text=text):
                self._line(text)
            case events.Probed(device=device, message=message, elapsed=elapsed):
                self._probed[device] = message
                self._line(f"{device}: {message} ({elapsed:.2f} s)")
            case events.Phase(device=device, phase="done", detail=events.POWERED_OFF):
                self._line(f"{device}: powered off; it can be pulled")
            case events.Phase(device=device, phase=phase):
                if phase in ("done", "failed"):
                    return  # the result line says it
                self._line(f"{device or 'image'}: {phase}")
                self._last[device] = time.monotonic()
            case events.Progress(device=device, phase=phase, done=done, total=total):
                now = time.monotonic()
                if now - self._last.get(device, 0.0) < self.interval:
                    return
                self._last[device] = now
                percent = f" ({100 * done // total}%)" if total else ""
                self._line(f"{device or 'image'}: {phase} {format_size(done)} of "
                           f"{format_size(total)}{percent}", droppable=True)
            case events.Result(result=r):
                tracker = self._trackers.pop(r.device, None)
                probed = self._probed.pop(r.device, None)
                if r.ok and probed and not (r.bytes_written or r.bytes_skipped or r.verified):
                    self._line(f"{r.device}: ok ({probed}){verdicts.identity(r)}")
                    return
                if r.ok and tracker is not None and tracker.phase == events.Step.READING:
                    self._line(verdicts.read_line(r, tracker))  # read: nothing was written
                    return
                self._line(verdicts.result_line(r, verdicts.speeds(tracker) if r.ok else ""))
            case events.Summary():
                self._line(verdicts.summary_line(event))
            case events.Watching():
                self._line("watching: plug in the drives to write (Ctrl-C to stop)")
            case events.DriveAdded(device=device, eligible=eligible, reason=reason):
                what = _drive_words(event)
                self._line(f"{device}: added ({what})" if eligible
                           else f"{device}: ignored ({what}): {reason}")
            case events.DriveRemoved(device=device):
                self._line(f"{device}: removed")

    def close(self) -> None:
        self.out.close()

    def announce(self, text: str) -> None:
        """A signal's news: on stderr, beside the log on stdout."""
        self.out.interrupted()
        say_on_stderr(text)


# ----------------------------------------------------------------------------------------------
# Live rows (flash, verify and watch on a terminal): see popsicle_py.live

_DriveRow = live.DriveRow  # their old names, for code that reaches for them here
_Rows = live.Board
_drive_names = live.drive_names
summary_table = live.summary_table


class RichView:
    """One live row per drive: name, port, bar, percent, speed, ETA and state; 80 columns first.

    The bar is the drive's whole job (written plus verified bytes, see :mod:`popsicle_py.rows`),
    so it only moves forward.  An error goes under its row, not over the others' numbers.
    The image has its row on top when there is news of it: its checksum, or its download
    (bytes received, stalled, resuming, failed, and "checked" only once a checksum matched).
    """

    def __init__(self, console: Console | None = None, labels: dict[str, str] | None = None,
                 *, writes: bool = True) -> None:
        self.console = console or live.ShownConsole()
        self.labels = labels or {}
        self.writes = writes
        self.verifies = True
        self.size: int | None = None
        self.board = live.Board()
        self.by_device: dict[str | None, live.DriveRow] = {}
        self.probed: dict[str, str] = {}  # a probe's verdict, for the table's details
        self.live = live.live_region(self.board, self.console)
        self.started = False
        self.closed = False
        self._undo_keys: Callable[[], None] = lambda: None

    def _row(self, device: str | None, info: events.DriveInfo | None = None) -> live.DriveRow:
        row = self.by_device.get(device)
        if row is None:
            if device is None:  # the image (its checksum, its download)
                row = live.DriveRow("image", progress.DriveProgress(writes=True, verifies=False))
            else:
                port, label = live.drive_names(info)
                row = live.DriveRow(device, progress.DriveProgress(writes=self.writes,
                                                                   verifies=self.verifies,
                                                                   size=self.size),
                                    port, label or self.labels.get(device, ""))
                row.link = live.link_of(info)
            self.by_device[device] = row
            self.board.add(row)
        return row

    def _start(self) -> None:
        self.live.start()
        self.started = True
        if self.console.is_terminal:
            self._undo_keys = live.quiet_keys()

    def handle(self, event: events.WatchEvent) -> None:
        if self.closed:
            return
        if not self.started and isinstance(event, events.Note):
            self.console.print(event.text, markup=False)  # before any row: no live display yet
            return
        if not self.started and not isinstance(event, events.Summary):
            self._start()
        now = time.monotonic()
        match event:
            case events.Started(devices=devices, size=size, verify=verify, drives=infos):
                self.size, self.verifies = size, verify or not self.writes
                for i, device in enumerate(devices):
                    self._row(device, infos[i] if i < len(infos) else None)
            case events.Note(text=text):
                self.live.console.print(text, markup=False)
            case events.Probed(device=device, message=message):
                self.probed[device] = message
                self.live.console.print(f"{device}: {message}", markup=False)
            case events.Phase(device=None, phase=phase, detail=detail):
                row = self._row(None)
                row.tracker.on_phase(phase, now)
                row.source = detail or ""
                row.say(phase)
            case events.Phase(device=str(device), phase=phase, detail=detail):
                image = self.by_device.get(None)
                if image is not None and image.tracker.ended is None \
                        and image.tracker.phase == "checksum":
                    image.tracker.on_end("ok", now)  # the drives start once it checked out
                    image.say("checked")
                row = self._row(device)
                if phase in ("done", "failed"):
                    return  # the result says how it ended
                row.tracker.on_phase(phase, now)
                row.say("repairing" if detail == "repairing" else phase)
            case events.Progress(device=device, phase=phase, done=done, total=total):
                self._row(device).progressed(phase, done, total, now)
            case events.Download():
                self._row(None).hear(event, now)
            case events.Result(result=r):
                self._end(self._row(r.device, r.drive), r, now)
            case events.Summary():
                self._stop_image(now, event)
                self.close()
                reads = self._reads(event)
                _print_end(self.console, event, live.FinalTable(
                    event, {**self._verdicts(event), **reads},
                    moved="Read" if reads and len(reads) == len(event.results) else "Written"))

    def _stop_image(self, now: float, summary: events.Summary) -> None:
        """A run that ended while the image was still read: its row keeps its numbers."""
        image = self.by_device.get(None)
        if image is not None and image.tracker.ended is None:
            word = "cancelled" if summary.cancelled else "stopped"
            image.tracker.on_end(word, now)
            image.say(word)

    def _reads(self, summary: events.Summary) -> dict[str, str]:
        """``read``'s drives: read into a file, not written (nor verified)."""
        return {r.device: "read" for r in summary.results
                if r.ok and (row := self.by_device.get(r.device)) is not None
                and row.tracker.phase == events.Step.READING}

    def _verdicts(self, summary: events.Summary) -> dict[str, str]:
        """A probe's verdict in the table, not "nothing to write"."""
        return {r.device: self.probed[r.device] for r in summary.results
                if r.ok and r.device in self.probed and not r.bytes_written
                and not r.bytes_skipped and not r.verified}

    def announce(self, text: str) -> None:
        """Say "stopping" inside the live display (called from a signal handler)."""
        self.board.footer = text

    def _end(self, row: live.DriveRow, r: events.DriveResult, now: float) -> None:
        row.tracker.on_result(r, now)
        if r.drive is not None and not row.port:  # a job that named its drives only here
            port, label = live.drive_names(r.drive)
            row.port, row.label = port, row.label or label
        if r.ok and r.device in self.probed and not r.bytes_written and not r.verified:
            row.bar = False
            row.say("ok", self.probed[r.device])
        elif r.ok and (r.verified or not self.writes):
            row.say("done")
        elif r.ok:
            row.say("written", "not verified", "written (not verified)")
        elif r.cause == events.Cause.SOURCE and self._image_failed():
            row.say(r.status, "the image failed (its row says why)")
        else:
            why = verdicts.strip_device(r.error, r.device) or ""
            row.say(r.status, "" if why == r.status else why)

    def _image_failed(self) -> bool:
        image = self.by_device.get(None)
        return image is not None and image.tracker.ended == "failed"

    def close(self) -> None:
        if self.started and not self.closed:
            self.live.refresh()
            self.live.stop()
            self._undo_keys()
        self.closed = self.closed or self.started
        self.started = False


def _print_end(console: Console, summary: events.Summary, table: live.FinalTable) -> None:
    """The table at the end, then its last word: the drives that did not end ok and why, or,
    when the table is taller than the screen (32 drives on 24 lines, its title scrolled
    away), how the run ended."""
    console.print(table)
    if not summary.ok and summary.results and (not all(r.ok for r in summary.results)
                                               or summary.uncertified):
        console.print(verdicts.not_ok(summary), highlight=False, soft_wrap=True)
    elif summary.results and len(console.render_lines(table, pad=False)) >= console.height:
        console.print(verdicts.summary_line(summary), highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------
# Duplicator mode (``popsicle-py watch``)


def _drive_words(event: events.DriveAdded) -> str:
    """``SanDisk Cruzer Blade, 8.4 MB, port 1-2``: what a drive that appeared is."""
    size = format_size(event.size) if event.size else "no medium"
    port = f"port {event.info.port_path}" if event.info and event.info.port_path else ""
    return ", ".join(part for part in (event.label, size, port) if part)


class _Header:
    """The duplicator's first line, in the longest form that fits the width."""

    def __init__(self, view: WatchView) -> None:
        self.view = view

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        v = self.view
        counts: list[str | tuple[str, str]] = [
            ("done ", "green"), str(v.ok), "  ", ("failed ", "red"), str(v.failed), "  ",
            "in progress ", str(v._busy())]
        finished = "" if v.count is None else f"  ({v.ok + v.failed} of {v.count} finished)"
        size = f" ({format_size(v.size)})  "
        shown = printable(v.image)
        for image, prefix in ((shown, "Duplicating "), (os.path.basename(shown), "")):
            text = Text.assemble((prefix, "bold"), (image, "bold"), size, *counts, finished)
            if text.cell_len <= options.max_width:
                break
        text.no_wrap, text.overflow = True, "ellipsis"
        yield text


#: Row states of the duplicator screen that mean "still being worked on".
_BUSY = ("waiting", "writing", "syncing", "verifying", "repairing")


class WatchView:
    """The duplicator screen: a header with counts, a row per drive seen, what to do next.

    Rows stay for the whole session (a stick re-inserted gets a new row); a finished drive
    says whether it can be pulled, a failed one says "failed: pull it".
    """

    def __init__(self, console: Console | None = None, image: str = "",
                 size: int | None = None, count: int | None = None, *,
                 verify: bool = True) -> None:
        self.console = console or live.ShownConsole()
        self.image, self.size, self.count = image, size, count
        self.verify = verify
        self.board = live.Board(reserve=4)
        self.current: dict[str | None, _DriveRow] = {}  # each device's latest row
        self.failed_present: dict[str, str] = {}  # failed drives not pulled yet
        #: Devices whose drive was pulled before its job ended (the session says so first).
        self.pulled: set[str] = set()
        self.ok = self.failed = self.started_drives = 0
        self.watching = False
        self.live = live.live_region(self, self.console)
        self.started = False
        self.closed = False
        self._undo_keys: Callable[[], None] = lambda: None

    # What Live renders, again at every refresh.
    def __rich__(self) -> Group:
        return Group(self._header(), self.board, self._next_step())

    def _busy(self) -> int:
        return sum(not r.final and r.name != "image" for r in self.board.rows)

    def _header(self) -> _Header:
        return _Header(self)

    def _next_step(self) -> Text:
        if not self.watching:
            return Text("preparing the image...", style="dim")
        busy = self._busy()
        parts: list[str] = []
        if self.failed_present:
            parts.append(f"pull the failed drive{'s' if len(self.failed_present) > 1 else ''} "
                         f"({', '.join(self.failed_present)})")
        if self.count is not None and self.started_drives >= self.count:
            if busy:
                parts.append(f"all {self.count} drives started: wait for them to finish")
        else:
            more = "" if self.count is None else \
                f" ({self.count - self.started_drives} more to go)"
            parts.append(f"plug in the next drive{more}")
        line = "; ".join(parts)
        return Text(f"-> {line[:1].upper()}{line[1:]}  (Ctrl-C stops)" if line else "",
                    style="bold cyan")

    def announce(self, text: str) -> None:
        """Say "stopping" inside the live display (called from a signal handler)."""
        self.board.footer = text

    def _new_row(self, device: str | None, info: events.DriveInfo | None = None,
                 label: str = "") -> _DriveRow:
        if device is None:
            row = _DriveRow("image", progress.DriveProgress(writes=True, verifies=False))
        else:
            port, known = _drive_names(info)
            row = _DriveRow(device, progress.DriveProgress(writes=True, verifies=self.verify,
                                                       size=self.size),
                            port, label or known)
            row.link = live.link_of(info)
        self.current[device] = row
        self.board.add(row)
        return row

    def _row(self, device: str | None) -> _DriveRow:
        return self.current.get(device) or self._new_row(device)

    def handle(self, event: events.WatchEvent) -> None:
        if self.closed:
            return
        if not self.started and not isinstance(event, events.Summary):
            self.live.start()
            self.started = True
            if self.console.is_terminal:
                self._undo_keys = live.quiet_keys()
        now = time.monotonic()
        match event:
            case events.Watching():
                self.watching = True
                if None in self.current:
                    self.current[None].tracker.on_end("ok", now)
                    self.current[None].say("ready")
            case events.DriveAdded(device=device, label=label, eligible=eligible, reason=reason,
                                   info=info):
                row = self._new_row(device, info, label)
                self.failed_present.pop(device, None)  # whatever was there is not now
                self.pulled.discard(device)
                if eligible:
                    self.started_drives += 1
                else:
                    row.bar = False
                    row.say("ignored", reason or "")
            case events.DriveRemoved(device=device):
                gone = self.current.get(device)
                self.failed_present.pop(device, None)
                if gone is not None and gone.final:
                    self.current.pop(device, None)  # the row stays; a new arrival gets a new one
                    if gone.state == "done" and "powered off" not in gone.detail:
                        gone.say("done")  # pulled: nothing more to do
                elif gone is not None:
                    self.pulled.add(device)  # its job's end comes next: nothing to pull then
            case events.Note(text=text):
                self.live.console.print(text, markup=False)
            case events.Phase(device=device, phase="done", detail=events.POWERED_OFF):
                row = self._row(device)
                row.say(row.state, "powered off: pull it", f"{row.state}, powered off: pull it")
            case events.Phase(device=device, phase=phase, detail=detail):
                row = self._row(device)
                if phase in ("done", "failed"):
                    return  # the result says how it ended
                row.tracker.on_phase(phase, now)
                row.source = detail or row.source if device is None else row.source
                row.say("repairing" if detail == "repairing" else phase)
            case events.Progress(device=device, phase=phase, done=done, total=total):
                self._row(device).progressed(phase, done, total, now)
            case events.Download():
                self._row(None).hear(event, now)
            case events.Result(result=r):
                row = self._row(r.device)
                row.tracker.on_result(r, now)
                if r.ok:
                    self.ok += 1
                    if r.verified:
                        row.say("done", "pull it")
                    else:
                        row.say("written", "not verified; pull it",
                                "written (not verified): pull it")
                elif r.status == "cancelled":
                    row.say("cancelled")
                else:
                    self.failed += 1
                    why = verdicts.strip_device(r.error, r.device) or r.status
                    if r.device in self.pulled or r.cause == events.Cause.REMOVED:
                        self.pulled.discard(r.device)
                        row.say(r.status, why)  # out already: never "pull" its name
                    else:
                        self.failed_present[r.device] = why
                        row.say(r.status, f"pull it ({why})")
            case events.Summary():
                self.close()
                _print_end(self.console, event, live.FinalTable(event))

    def close(self) -> None:
        if self.started and not self.closed:
            self.live.refresh()
            self.live.stop()
            self._undo_keys()
        self.closed = self.closed or self.started
        self.started = False
