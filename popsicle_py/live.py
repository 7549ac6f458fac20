"""The live rows of a terminal view: what each row says now, the fold, the screen's edges.

:class:`DriveRow` turns a drive's (or the image's) progress into a :class:`rows.Row`;
:class:`Board` lays the rows out for the console at every refresh, folds the rows that ended
ok when the screen is short (never a failed one), and counts what it folded.  The terminal's
edges live here too: typed keys are not echoed over the rows (a typed ^C would push them down
and leave a copy behind), and a narrowed terminal's re-wrapped lines are all cleared.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.control import Control
from rich.live import Live
from rich.live_render import LiveRender
from rich.measure import Measurement
from rich.segment import ControlType, Segment
from rich.table import Table
from rich.text import Text

from popsicle_py import events, progress, rows, signals, verdicts
from popsicle_py.defaults import DEFAULT_BUCKET_SIZE
from popsicle_py.files import silence_hung_up_terminal
from popsicle_py.units import format_link_speed, format_size
from popsicle_py.view_json import printable

STYLES = {"done": "green", "ok": "green", "written": "green", "checked": "green", "ready": "green",
          "downloaded": "green", "failed": "red", "invalid": "red", "rejected": "red",
          "cancelled": "yellow",
          "stalled": "yellow", "resuming": "yellow", "ignored": "dim", "waiting": "dim"}
#: A drive whose bytes have not moved for this long while the download is behind waits for it.
WAIT_SHOWN = 1.5
#: The download says "stalled" when no byte came for this long and no drive is moving either.
STALL_SHOWN = 3.0
#: The least widths of the live columns: a speed or an ETA that comes and goes, or a state
#: that changes, never moves the bar ("1023.9 KiB/s", "downloaded").
FLOORS = {"speed": 12, "eta": 4, "state": 10}
_WORK = ("probing", "writing", "syncing", "verifying", "downloading", "checksum",
         "decompressing")


class DriveRow:
    """One row on screen: a drive's identity, its progress, and what it says now."""

    def __init__(self, name: str, tracker: progress.DriveProgress, port: str = "",
                 label: str = "") -> None:
        self.name, self.port, self.label = name, port, label
        self.link = ""  # the USB link's speed ("480 Mbit/s"), shown when the width allows
        self.tracker = tracker
        self.state = "waiting"
        self.long = ""  # the state with its detail, when there is room for it on the row
        self.detail = ""  # the detail on its own line under the row
        self.bar = True
        self.image = name == "image"
        self.source = ""  # the image row: the URL (or checksum file) it is about

    def say(self, state: str, detail: str = "", long: str = "") -> None:
        """``long`` is the row's words when they fit (default ``state: detail``)."""
        self.state, self.detail = state, detail
        self.long = long or (f"{state}: {detail}" if detail else "")

    def progressed(self, phase: str, done: int, total: int | None, now: float) -> None:
        before = self.tracker.done
        self.tracker.on_progress(phase, done, total, now)
        if self.state == "resuming" and self.tracker.done > before:
            self.say(phase)  # bytes again: the resumed download goes on

    def hear(self, news: events.Download, now: float) -> None:
        """The image's download: resuming (where, why), failed (why), complete (checked?)."""
        why = (news.detail or "").removeprefix(f"{self.source}: ")
        if news.state == events.Fetch.RESUMING:
            where = f"resuming at {format_size(news.received)} ({why})"
            self.say("resuming", where, where)
        elif news.state == events.Fetch.FAILED:
            self.tracker.on_end("failed", now, news.received)
            self.say("failed", why)
        else:
            self.tracker.on_end("ok", now, news.received)
            self.say("checked" if news.checked else "downloaded")

    @property
    def final(self) -> bool:
        return self.tracker.ended is not None or self.state == "ignored"

    @property
    def kind(self) -> str:
        """What the row is to the fold: the image and a row that did not end ok stay."""
        if self.image or (self.tracker.ended not in (None, "ok")):
            return rows.KEEP
        return rows.OK if self.final else rows.BUSY

    def pass_word(self) -> str:
        """What the row's byte counts are: the bytes of which pass."""
        t = self.tracker
        if self.image:
            return "received" if t.phase == "downloading" else "read"
        if t.ended == "ok":
            return "verified" if t.verifies else "written"
        return "verified" if t.phase in progress.VERIFY_PHASES or not t.writes else "written"

    def snapshot(self, now: float, waiting: bool = False, stalled: bool = False) -> rows.Row:
        """The row now; ``waiting``: a drive with no data to write (the download is behind);
        ``stalled``: the download, when nothing has come for a while."""
        t = self.tracker
        speed = eta = ""
        state, detail, long = self.state, self.detail, self.long
        if t.ended == "ok":
            speed, eta = rows.format_speed(t.average_speed), "avg" if t.average_speed else ""
        elif t.ended is None and self.state != "ignored" and t.phase is not None:
            live = t.speed(now)
            if live and not waiting and not stalled:
                speed, eta = rows.format_speed(live), rows.format_eta(t.eta(now))
        if waiting:
            state, detail, long = "waiting", "", "waiting for the download"
        elif stalled:
            idle = int(t.idle(now))
            detail = f"no data for {idle} s"
            state, long = "stalled", f"stalled: {detail}"
        ended = t.ended is not None
        fraction = t.fraction
        return rows.Row(name=printable(self.name), state=printable(state),
                        port=printable(self.port), label=printable(self.label),
                        link=self.link, fraction=fraction if self.bar else 0.0, done=t.pass_done,
                        total=t.pass_size, speed=speed, eta=eta, detail=printable(detail),
                        long=printable(long),
                        style=STYLES.get(state, ""), bar=self.bar, pulse=int(now * 10),
                        moving=not ended, pass_word=self.pass_word())


class Board:
    """The live rows as a Rich renderable, laid out anew for the console's size each time."""

    def __init__(self, reserve: int = 1) -> None:
        self.rows: list[DriveRow] = []
        self.footer = ""  # "SIGINT: stopping every drive...", set from a signal handler
        self.reserve = reserve  # lines the rest of the screen needs (header, next step)

    def add(self, row: DriveRow) -> None:
        """A new row: the image's on top (for files and URLs alike), drives in order."""
        if row.image:
            self.rows.insert(0, row)
        else:
            self.rows.append(row)

    def _download(self) -> DriveRow | None:
        image = self.rows[0] if self.rows and self.rows[0].image else None
        if image is None or image.tracker.ended is not None or image.tracker.phase \
                != "downloading":
            return None
        return image

    def snapshots(self, now: float) -> list[rows.Row]:
        """Every row now: drives without data say they wait, a silent download says stalled.

        Nothing moving is not enough: a drive that hangs holds the ring full, and then the
        download and the other drives stop too.  For an image downloaded as written (not
        compressed) a drive waits for data only when it has written nearly all that came
        (within two of the default buckets); the download is stalled only when every drive
        at work waits so.
        """
        download = self._download()
        busy = [r for r in self.rows if not r.image and not r.final and r.tracker.phase
                in (*progress.WRITE_PHASES, "probing")]

        def starved(r: DriveRow) -> bool:
            assert download is not None
            got, size = download.tracker.written, download.tracker.pass_size
            raw = size is not None and size == r.tracker.pass_size
            return r.tracker.idle(now) >= WAIT_SHOWN and (
                not raw or got - r.tracker.written <= 2 * DEFAULT_BUCKET_SIZE)

        quiet = download is not None and download.tracker.idle(now) >= WAIT_SHOWN
        waiting = {id(r) for r in busy if quiet and starved(r)}
        stalled = download is not None and download.state != "resuming" \
            and download.tracker.idle(now) >= STALL_SHOWN \
            and all(id(r) in waiting and r.tracker.idle(now) >= STALL_SHOWN - 1 for r in busy)
        return [r.snapshot(now, waiting=id(r) in waiting, stalled=stalled and r is download)
                for r in self.rows]

    def floors(self, shown: Sequence[rows.Row]) -> dict[str, int]:
        """Least column widths for these rows: the byte counts as wide as they will get."""
        widest = [rows.byte_counts(dataclasses.replace(r, done=r.total, pass_word="verified"))
                  for r in shown if r.total is not None and r.pass_word]
        return {**FLOORS, "nbytes": max(map(len, widest), default=0)}

    def lines(self, width: int, height: int, now: float) -> list[Text]:
        shown = self.snapshots(now)
        blocks: list[Sequence[rows.Line]] = list(
            rows.layout_rows(shown, width, self.floors(shown)))
        room = max(3, height - self.reserve - bool(self.footer))
        blocks, folded = rows.fold(blocks, [r.kind for r in self.rows], room)
        out = []
        if folded:  # the table at the end lists every drive
            parts = [f"{folded[k]} {w}" for k, w in ((rows.OK, "ok"),
                                                     (rows.BUSY, "in progress"))
                     if folded.get(k)]
            out.append(Text(f"({' and '.join(parts)} not shown; the table at the end lists "
                            "every drive)", style="dim", no_wrap=True, overflow="ellipsis"))
        for line in (line for block in blocks for line in block):
            text = Text(no_wrap=True, overflow="crop")
            for piece in line:
                text.append(piece.text, piece.style or None)
            out.append(text)
        if self.footer:
            out.append(Text(self.footer, style="yellow"))
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.lines(options.max_width, options.height or console.height,
                              time.monotonic())


# ----------------------------------------------------------------------------------------------
# The terminal's edges


class ShownConsole(Console):
    """A Rich console for text that is anybody's (file names, mount points, model strings).

    No markup (``[/x]`` in a path is no closing tag that fails the run, ``[conceal]`` hides
    nothing), no emoji codes (``:warning:`` stays as typed), and no character that is not
    printable: see :func:`popsicle_py.view_json.printable`.  Styles are given as styles.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**{"highlight": False, **options, "markup": False, "emoji": False})

    def render_str(self, text: str, **options: Any) -> Text:
        return super().render_str(printable(text, newlines=True), **options)

    def on_broken_pipe(self) -> None:
        """The reader left (``list | head -1``): Rich's own answer is to exit 1 at once, as
        though the command had failed; the caller says what a reader that left means."""
        self.quiet = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.file.fileno())  # so that the exit's own flush is quiet
            os.close(devnull)
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    def _check_buffer(self) -> None:
        """A terminal that went away (EIO): the output ends there and the run goes on.  The
        live rows are drawn from Rich's own thread, where the error went unseen (the thread
        died, its traceback on stderr) or, from a refresh at the end, escaped as "unexpected
        error"; a foreground run that goes on hears the hang-up as SIGHUP."""
        try:
            super()._check_buffer()
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            self.quiet = True
            del self._buffer[:]
            silence_hung_up_terminal()



class _Reflowed(LiveRender):
    """Rich's live region, knowing that a terminal made narrower re-wraps the lines drawn.

    Rich moves the cursor up by the height it drew; a narrower terminal (tmux, VTE, kitty)
    has re-wrapped each longer line onto several, and the rows left above would stay as
    ghosts.  The way up counts the lines as they are on the screen now.
    """

    def __init__(self, renderable: RenderableType, console: Console) -> None:
        super().__init__(renderable, vertical_overflow="ellipsis")
        self.console = console
        self._drawn: tuple[int, list[int]] = (0, [])  # width drawn at, each line's cells

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        out = [s for s in super().__rich_console__(console, options) if isinstance(s, Segment)]
        lines = list(Segment.split_lines(out))
        self._drawn = (options.max_width, [Segment.get_line_length(ln) for ln in lines])
        yield from out

    def _height(self) -> int:
        drawn, lengths = self._drawn
        now = self.console.width
        if not lengths or now >= drawn or now <= 0:
            return self._shape[1] if self._shape is not None else 0
        return sum(max(1, -(-n // now)) for n in lengths)

    def position_cursor(self) -> Control:
        if self._shape is None:
            return Control()
        up = ((ControlType.CURSOR_UP, 1), (ControlType.ERASE_IN_LINE, 2))
        return Control(ControlType.CARRIAGE_RETURN, (ControlType.ERASE_IN_LINE, 2),
                       *(up * (self._height() - 1)))

    def restore_cursor(self) -> Control:
        if self._shape is None:
            return Control()
        up = ((ControlType.CURSOR_UP, 1), (ControlType.ERASE_IN_LINE, 2))
        return Control(ControlType.CARRIAGE_RETURN, *(up * self._height()))


def live_region(renderable: RenderableType, console: Console) -> Live:
    """Rich's Live for ``renderable``, its way up counting re-wrapped lines."""
    live = Live(renderable, console=console, refresh_per_second=4, redirect_stdout=False,
                redirect_stderr=False)
    live._live_render = _Reflowed(live.get_renderable(), console)
    return live


def quiet_keys() -> Callable[[], None]:
    """Stop the terminal echoing typed keys (``^C``, Enter) over the rows; returns the undo.

    Ctrl-C still interrupts: only the echo goes.  The undo also runs at exit, and before a
    second Ctrl-C quits at once.
    """
    stream: Any = sys.stdin
    try:
        import termios

        fd = stream.fileno()
        if not stream.isatty():
            return lambda: None
        saved = termios.tcgetattr(fd)
        quiet = list(saved)
        quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
    except (ImportError, OSError, ValueError, AttributeError):
        return lambda: None

    def undo() -> None:
        with contextlib.suppress(OSError, ValueError, termios.error):
            termios.tcsetattr(fd, termios.TCSANOW, saved)
        atexit.unregister(undo)
        with contextlib.suppress(ValueError):
            signals.AT_QUIT.remove(undo)

    atexit.register(undo)
    signals.AT_QUIT.append(undo)
    return undo


# ----------------------------------------------------------------------------------------------
# The table at the end


def drive_names(info: events.DriveInfo | None) -> tuple[str, str]:
    """(port, label) of a drive for its row."""
    if info is None:
        return "", ""
    vendor, model = info.vendor, info.model
    if vendor and model.lower().startswith(vendor.lower()):
        vendor = ""
    return info.port_path or "", " ".join(p for p in (vendor, model) if p)


def link_of(info: events.DriveInfo | None) -> str:
    """A drive's USB link speed for its row ("480 Mbit/s"), or ""."""
    return format_link_speed(info.link_speed) if info is not None and info.link_speed else ""


_STYLES = {"ok": "green", "failed": "bold red", "invalid": "bold red", "rejected": "bold red",
           "cancelled": "yellow"}


def _words(r: events.DriveResult, details: dict[str, str]) -> str:
    """What a person acts on, for one drive's row or line."""
    if r.ok:
        return details.get(r.device) or verdicts.ok_words(r) + verdicts.extras(r)
    return verdicts.strip_device(r.error, r.device) or ""


def summary_table(summary: events.Summary, details: dict[str, str] | None = None, *,
                  moved: str = "Written", digests: bool = True, words: bool = True) -> Table:
    """The end of a run: one line per drive, those that did not end ok first, with the words
    a person acts on.  ``details`` replaces an ok drive's words (a probe's verdict, "read");
    ``moved`` heads the bytes' column ("Read" for drives read into files); ``digests``: a
    column of what each drive read back, when some drive has it (see :class:`FinalTable`)."""
    details = details or {}
    table = Table(title=verdicts.summary_line(summary, names=False), title_justify="left")
    results = sorted(summary.results, key=lambda r: r.ok)  # stable: in order within each
    ports = any(r.drive is not None and r.drive.port_path for r in results)
    seqs = len(results) > 1 and all(r.drive is not None and r.drive.seq is not None
                                    for r in results)
    if seqs:
        table.add_column("#", justify="right")
    table.add_column("Drive", no_wrap=True)
    if ports:
        table.add_column("Port", no_wrap=True)
    table.add_column("Result", no_wrap=True)
    table.add_column(moved, justify="right", no_wrap=True)
    table.add_column("Time", justify="right", no_wrap=True)
    if words:
        table.add_column("Details", overflow="fold", ratio=1)
    digests = digests and any(r.device_sha256 for r in results)
    if digests:  # what each drive read back: the proof a person copies (whole, folded)
        table.add_column("SHA-256 (read back)", overflow="fold", min_width=16)
    for r in results:
        cells: list[str | Text] = [str(r.drive.seq)] if seqs and r.drive is not None else []
        cells.append(r.device)
        if ports:
            cells.append((r.drive.port_path if r.drive is not None else None) or "")
        cells += [Text(r.status, _STYLES.get(r.status, "")), format_size(r.bytes_written),
                  "" if r.elapsed is None else f"{r.elapsed:.1f} s"]
        if words:
            cells.append(_words(r, details))
        if digests:
            cells.append(r.device_sha256 or "")
        table.add_row(*cells)
    return table


class FinalTable:
    """The table at the end, fitted to the width it is printed at.

    A table wider than the terminal is cut at its edge, and a digest cut there is a wrong one
    that a person may copy (at 80 columns, ten drives or more: the 16th character of each of
    its lines was gone).  When the digests do not fit beside the other columns, the table goes
    without them and each follows whole on a line of its own, as ``sha256sum`` prints it.
    """

    def __init__(self, summary: events.Summary, details: dict[str, str] | None = None, *,
                 moved: str = "Written") -> None:
        self.summary, self.details, self.moved = summary, details, moved

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        read_back = [r for r in sorted(self.summary.results, key=lambda r: r.ok)
                     if r.device_sha256]
        if self._narrow(console, options):
            yield from summary_lines(self.summary, self.details or {})
        else:
            table = summary_table(self.summary, self.details, moved=self.moved)
            if not read_back or not _cut(console, options, table):
                yield table
                return
            yield summary_table(self.summary, self.details, moved=self.moved, digests=False)
        if not read_back:
            return
        yield Text("SHA-256 of what each drive read back:")
        devices = [r.device for r in read_back]
        twice = len(set(devices)) < len(devices)  # a watch session: the kernel reuses names
        for r in read_back:
            seq = f"#{r.drive.seq} " if twice and r.drive is not None \
                and r.drive.seq is not None else ""
            yield Text(f"{r.device_sha256}  {seq}{r.device}", overflow="fold")


    def _narrow(self, console: Console, options: ConsoleOptions) -> bool:
        """Too narrow for a table: its Details column would get fewer than DETAILS_MIN
        columns (at 50, each drive's words stood one letter per line)."""
        if not self.summary.results:
            return False
        fixed = summary_table(self.summary, self.details, moved=self.moved, digests=False,
                              words=False)
        width = Measurement.get(console, options, fixed).maximum
        return options.max_width - width - 3 < DETAILS_MIN  # its border and padding


#: The fewest columns a drive's words may have in the table's Details column.
DETAILS_MIN = 24


def summary_lines(summary: events.Summary, details: dict[str, str]) -> list[Text]:
    """The end of a run in a narrow terminal: the summary, then one paragraph per drive,
    wrapped at words (``#1 /dev/sdb (port 1-2): ok, 8 MiB in 2.4 s: written and ...``)."""
    lines = [Text(verdicts.summary_line(summary, names=False))]
    for r in sorted(summary.results, key=lambda r: r.ok):
        line = Text()
        if r.drive is not None and r.drive.seq is not None and len(summary.results) > 1:
            line.append(f"#{r.drive.seq} ")
        line.append(r.device)
        if r.drive is not None and r.drive.port_path:
            line.append(f" (port {r.drive.port_path})")
        line.append(": ")
        line.append(r.status, _STYLES.get(r.status, ""))
        line.append(f", {format_size(r.bytes_written)}")
        if r.elapsed is not None:
            line.append(f" in {r.elapsed:.1f} s")
        words = _words(r, details)
        if words:
            line.append(f": {words}")
        lines.append(line)
    return lines


def _cut(console: Console, options: ConsoleOptions, table: Table) -> bool:
    """``table`` is wider than the width: its top border, as drawn, misses its right corner."""
    if table.box is None:
        return False
    for line in console.render_lines(table, options, pad=False):
        drawn = "".join(segment.text for segment in line).rstrip()
        if drawn.startswith(table.box.top_left):
            return not drawn.endswith(table.box.top_right)
    return False
