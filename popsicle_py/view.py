"""Views: render a job's events for a terminal (Rich), for a log (plain lines) or for a script.

A view only renders; it decides nothing about drives.  Each has ``handle(event)`` and
``close()``; the CLI picks one from the output's nature and the user's flags.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import IO

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from popsicle_py import events
from popsicle_py.units import format_size

#: Plain output prints a drive's progress at most this often.
PLAIN_INTERVAL = 5.0
#: JSON output sends a drive's progress at most this often (results are never held back).
JSON_INTERVAL = 0.5


def _write(out: IO[str], text: str) -> IO[str] | None:
    """Write and flush; when the reader has gone (a closed pipe), stop writing, not flashing.

    The drives are worth more than the log: a run whose output pipe closes (``| head``)
    finishes every drive, and its exit status still tells the truth.
    """
    try:
        out.write(text)
        out.flush()
        return out
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, out.fileno())  # so that the exit's own flush is quiet too
        os.close(devnull)
        return None


class JsonView:
    """One JSON object per line, flushed as it happens; the summary is always last."""

    def __init__(self, out: IO[str] | None = None, interval: float = JSON_INTERVAL) -> None:
        self.out: IO[str] | None = out or sys.stdout
        self.interval = interval
        self._last: dict[tuple[str | None, str], float] = {}

    def handle(self, event: events.Event) -> None:
        if self.out is None:
            return
        if isinstance(event, events.Progress):
            key = (event.device, event.phase)
            now = time.monotonic()
            complete = event.total is not None and event.done >= event.total
            if not complete and now - self._last.get(key, 0.0) < self.interval:
                return
            self._last[key] = now
        self.out = _write(self.out, json.dumps(event.to_json()) + "\n")

    def close(self) -> None:
        if self.out is not None:
            self.out = _write(self.out, "")


class PlainView:
    """For logs and pipes: a line per state change, a progress line every few seconds."""

    def __init__(self, out: IO[str] | None = None, interval: float = PLAIN_INTERVAL) -> None:
        self.out: IO[str] | None = out or sys.stdout
        self.interval = interval
        self._last: dict[str | None, float] = {}

    def _line(self, text: str) -> None:
        if self.out is not None:
            self.out = _write(self.out, text + "\n")

    def handle(self, event: events.WatchEvent) -> None:
        match event:
            case events.Started(image=image, size=size, devices=devices):
                self._line(f"image {image} ({format_size(size)}) -> {', '.join(devices)}")
            case events.Note(text=text):
                self._line(text)
            case events.Probed(device=device, message=message, elapsed=elapsed):
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
                           f"{format_size(total)}{percent}")
            case events.Result(result=r):
                self._line(_result_line(r))
            case events.Summary():
                self._line(_summary_line(event))
            case events.Watching():
                self._line("watching: plug in the drives to write (Ctrl-C to stop)")
            case events.DriveAdded(device=device, eligible=eligible, reason=reason):
                what = _drive_words(event)
                self._line(f"{device}: added ({what})" if eligible
                           else f"{device}: ignored ({what}): {reason}")
            case events.DriveRemoved(device=device):
                self._line(f"{device}: removed")

    def close(self) -> None:
        self.out.flush()


def _extras(r: events.DriveResult) -> str:
    """What a result says beyond its status: bytes skipped, buckets repaired."""
    parts = []
    if r.bytes_skipped:
        parts.append(f"{format_size(r.bytes_skipped)} already there")
    if r.repaired:
        parts.append(f"repaired {r.repaired} bucket{'s' if r.repaired != 1 else ''}")
    return "".join(f", {p}" for p in parts)


def _result_line(r: events.DriveResult) -> str:
    if r.ok:
        flashed = r.bytes_written or r.bytes_skipped
        what = f"{format_size(r.bytes_written)} written" if flashed else "matches the image"
        return f"{r.device}: ok ({what}{_extras(r)})"
    return f"{r.device}: {r.status}: {_strip_device(r.error, r.device) or r.status}"


def _strip_device(text: str | None, device: str) -> str | None:
    if text and text.startswith(device + ": "):
        return text[len(device) + 2 :]
    return text


def _summary_line(summary: events.Summary) -> str:
    good = sum(r.ok for r in summary.results)
    total = len(summary.results)
    if not total:
        return "cancelled: no drive was written" if summary.cancelled else "no drive was written"
    if summary.ok:
        return f"done: {good} of {total} drives ok"
    if summary.cancelled:
        return f"cancelled: {good} of {total} drives ok"
    return f"finished with problems: {good} of {total} drives ok"


def drive_progress(console: Console) -> Progress:
    """One row per drive: name, bar, percent, bytes, speed, ETA and state."""
    return Progress(
        TextColumn("[bold]{task.fields[name]}", justify="left"),
        BarColumn(bar_width=None),
        TextColumn("{task.percentage:>3.0f}%"),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[state]}"),
        console=console,
        expand=True,
    )


class RichView:
    """One live row per drive: name, bar, percent, bytes, speed, ETA and state."""

    def __init__(self, console: Console | None = None, labels: dict[str, str] | None = None
                 ) -> None:
        self.console = console or Console(stderr=False)
        self.labels = labels or {}
        self.progress = drive_progress(self.console)
        self.tasks: dict[str | None, TaskID] = {}
        self.started = False
        self.size: int | None = None

    def _task(self, device: str | None) -> TaskID:
        if device not in self.tasks:
            name = device or "image"
            label = self.labels.get(device or "")
            if label:
                name = f"{name} {label}"
            self.tasks[device] = self.progress.add_task("", name=name, state="waiting",
                                                        total=None)
        return self.tasks[device]

    def handle(self, event: events.Event) -> None:
        if not self.started and not isinstance(event, events.Summary):
            self.progress.start()
            self.started = True
        match event:
            case events.Started(devices=devices, size=size):
                self.size = size
                for device in devices:
                    self._task(device)
            case events.Note(text=text):
                self.progress.console.print(text)
            case events.Probed(device=device, message=message):
                self.progress.console.print(f"{device}: {message}")
            case events.Phase(device=device, phase=phase, detail=detail):
                task = self._task(device)
                state = phase
                if phase == "failed":
                    state = f"[red]failed: {_strip_device(detail, device or '')}"
                elif phase == "done":
                    state = "[green]done"
                if phase in ("writing", "verifying", "checksum"):
                    # reset() replaces every field (the row's name too): set state after.
                    self.progress.reset(task, total=self.size)
                    self.progress.update(task, state=state)
                elif phase == "done" and self.size:
                    self.progress.update(task, total=self.size, completed=self.size, state=state)
                else:
                    self.progress.update(task, state=state)
            case events.Progress(device=device, done=done, total=total):
                self.progress.update(self._task(device), completed=done, total=total)
            case events.Summary():
                self.close()
                self.console.print(summary_table(event))

    def close(self) -> None:
        if self.started:
            self.progress.stop()
            self.started = False


def summary_table(summary: events.Summary) -> Table:
    table = Table(title=_summary_line(summary), title_justify="left")
    table.add_column("Drive")
    table.add_column("Result")
    table.add_column("Written", justify="right")
    table.add_column("Time", justify="right")
    table.add_column("Details", overflow="fold")
    styles = {"ok": "green", "failed": "red", "invalid": "red", "cancelled": "yellow"}
    for r in summary.results:
        details = _strip_device(r.error, r.device) or ""
        if r.ok:
            details = ("written and verified" if r.bytes_written else "ok") + _extras(r)
        table.add_row(r.device, f"[{styles.get(r.status, '')}]{r.status}",
                      format_size(r.bytes_written),
                      "" if r.elapsed is None else f"{r.elapsed:.1f} s", details)
    return table


# ----------------------------------------------------------------------------------------------
# Duplicator mode (``popsicle-py watch``)


def _drive_words(event: events.DriveAdded) -> str:
    """``SanDisk Cruzer Blade, 8.4 MB``: what a drive that appeared is."""
    size = format_size(event.size) if event.size else "no medium"
    return ", ".join(part for part in (event.label, size) if part)


#: Row states of the duplicator screen that mean "still being worked on".
_BUSY = ("waiting", "writing", "syncing", "verifying")


class WatchView:
    """The duplicator screen: a header with counts, a row per drive seen, what to do next.

    Rows stay for the whole session (a stick re-inserted gets a new row); a finished drive
    says whether it can be pulled, a failed one says "failed: pull it".
    """

    def __init__(self, console: Console | None = None, image: str = "",
                 size: int | None = None, count: int | None = None) -> None:
        self.console = console or Console(stderr=False)
        self.image, self.size, self.count = image, size, count
        self.progress = drive_progress(self.console)
        self.rows: dict[str | None, TaskID] = {}  # each device's latest row ("None": image)
        self.states: dict[TaskID, str] = {}  # waiting, writing... done, failed, ignored
        self.failed_present: dict[str, str] = {}  # failed drives not pulled yet
        self.powered_off: set[TaskID] = set()
        self.ok = self.failed = self.started_drives = 0
        self.watching = False
        self.live = Live(self, console=self.console, refresh_per_second=4)
        self.started = False

    # What Live renders, again at every refresh.
    def __rich__(self) -> Group:
        return Group(self._header(), self.progress, self._next_step())

    def _header(self) -> Text:
        busy = sum(state in _BUSY for state in self.states.values())
        text = Text.assemble(("Duplicating ", "bold"), (self.image, "bold"),
                             f" ({format_size(self.size)})  ",
                             ("done ", "green"), str(self.ok), "  ",
                             ("failed ", "red"), str(self.failed), "  ",
                             "in progress ", str(busy))
        if self.count is not None:
            text.append(f"  ({self.ok + self.failed} of {self.count} finished)")
        return text

    def _next_step(self) -> Text:
        if not self.watching:
            return Text("preparing the image...", style="dim")
        busy = sum(state in _BUSY for state in self.states.values())
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

    def _row(self, device: str | None, name: str | None = None, state: str = "waiting"
             ) -> TaskID:
        if name is not None or device not in self.rows:
            task = self.progress.add_task("", name=name or device or "image", state=state,
                                          total=None)
            self.rows[device] = task
            self.states[task] = "waiting" if state == "waiting" else "ignored"
        return self.rows[device]

    def _set(self, task: TaskID, state: str, shown: str | None = None) -> None:
        self.states[task] = state
        self.progress.update(task, state=shown if shown is not None else state)

    def handle(self, event: events.WatchEvent) -> None:
        if not self.started and not isinstance(event, events.Summary):
            self.live.start()
            self.started = True
        match event:
            case events.Watching():
                self.watching = True
                if None in self.rows:
                    self._set(self.rows[None], "ready", "[green]ready")
            case events.DriveAdded(device=device, label=label, eligible=eligible, reason=reason):
                name = f"{device} {label}" if label else device
                if eligible:
                    self.started_drives += 1
                    self._row(device, name)
                else:
                    task = self._row(device, name, state="ignored")
                    self.progress.update(task, total=0, state=f"[dim]ignored: {reason}")
            case events.DriveRemoved(device=device):
                task = self.rows.get(device)
                self.failed_present.pop(device, None)
                if task is not None and self.states.get(task) in ("done", "failed", "ignored"):
                    self.rows.pop(device, None)  # the row stays; a new arrival gets a new one
                    if self.states[task] == "done" and task not in self.powered_off:
                        self._set(task, "done", "[green]done")  # pulled: nothing more to do
            case events.Note(text=text):
                self.live.console.print(text)
            case events.Phase(device=device, phase="done", detail=events.POWERED_OFF):
                task = self._row(device)
                self.powered_off.add(task)  # it goes away by itself, but is still plugged in
                self._set(task, "done", "[green]done, powered off: pull it")
            case events.Phase(device=device, phase=phase, detail=detail):
                task = self._row(device)
                if phase == "failed":
                    why = _strip_device(detail, device or "") or "failed"
                    if device is not None:
                        self.failed_present[device] = why
                    self._set(task, "failed", f"[red]failed: pull it ({why})")
                elif phase == "done":
                    total = self.progress.tasks[task].total
                    if total:
                        self.progress.update(task, completed=total)
                    self._set(task, "done", "[green]done: pull it")
                else:
                    if phase in ("writing", "verifying", "checksum", "decompressing"):
                        self.progress.reset(task, total=None)
                    self._set(task, phase)
            case events.Progress(device=device, done=done, total=total):
                self.progress.update(self._row(device), completed=done, total=total)
            case events.Result(result=r):
                if r.ok:
                    self.ok += 1
                elif r.status != "cancelled":
                    self.failed += 1
                task = self.rows.get(r.device)
                if task is not None and r.status == "cancelled":
                    self._set(task, "cancelled", "[yellow]cancelled")
            case events.Summary():
                self.close()
                self.console.print(summary_table(event))

    def close(self) -> None:
        if self.started:
            self.live.refresh()
            self.live.stop()
            self.started = False
