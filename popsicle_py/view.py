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

from rich.console import Console
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

    def handle(self, event: events.Event) -> None:
        match event:
            case events.Started(image=image, size=size, devices=devices):
                self._line(f"image {image} ({format_size(size)}) -> {', '.join(devices)}")
            case events.Note(text=text):
                self._line(text)
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
    if summary.ok:
        return f"done: {good} of {total} drives ok"
    if summary.cancelled:
        return f"cancelled: {good} of {total} drives ok"
    return f"finished with problems: {good} of {total} drives ok"


class RichView:
    """One live row per drive: name, bar, percent, bytes, speed, ETA and state."""

    def __init__(self, console: Console | None = None, labels: dict[str, str] | None = None
                 ) -> None:
        self.console = console or Console(stderr=False)
        self.labels = labels or {}
        self.progress = Progress(
            TextColumn("[bold]{task.fields[name]}", justify="left"),
            BarColumn(bar_width=None),
            TextColumn("{task.percentage:>3.0f}%"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[state]}"),
            console=self.console,
            expand=True,
        )
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
