"""One progress measure per drive, and drive rows laid out to fit the terminal's width.

Pure code over plain data (the clock is a parameter), shared by the live views and the report.

The measure: a flash does two passes over the same bytes, so its total work is the bytes to
write plus the bytes to verify (twice the image, or the block map's mapped bytes; once with
``--no-verify``), and the work done is the bytes written (or found identical) plus the bytes
verified.  The job reports each phase on its own (``Progress(device, phase, done, total)``,
reset at every phase, the first bucket written last); adding them here means the bar never
runs backwards and the total never jumps between phases.  ``verify`` alone has one pass.
When the image's size is unknown (gzip and bzip2 do not record it) there is no total until
the end: the row shows bytes and speed and no invented percentage.
"""

from __future__ import annotations

import textwrap
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from popsicle_py.units import format_size

#: The speed shown is measured over this many seconds (long enough to smooth a bucket's burst).
SPEED_WINDOW = 5.0
#: Phases whose bytes are writes (``syncing`` is the first bucket, written last).
WRITE_PHASES = ("writing", "syncing")
VERIFY_PHASES = ("verifying", "reading")  # reading: ``read``'s one pass


class DriveProgress:
    """Written plus verified bytes of one drive, and its speeds; fed the job's events."""

    def __init__(self, *, writes: bool = True, verifies: bool = True,
                 size: int | None = None) -> None:
        self.writes, self.verifies = writes, verifies
        self.pass_size = size  # bytes of one pass (image or mapped bytes); None: unknown yet
        self.written = 0  # bytes written or found identical, the largest the job reported
        self.verified = 0  # bytes verified, summed over verify passes
        self._pass_done = 0  # of the current verify pass
        self._shown = 0  # never decreases: what the bar shows
        self.phase: str | None = None
        self.ended: str | None = None  # final status once known
        self._since: float | None = None  # start of the current phase
        self.started: float | None = None
        self.finished: float | None = None
        self.write_time = 0.0
        self.verify_time = 0.0
        self._samples: deque[tuple[float, int]] = deque()

    # Feeding

    def on_phase(self, phase: str, now: float) -> None:
        self._close_phase(now)
        if self.started is None and phase in (*WRITE_PHASES, *VERIFY_PHASES):
            self.started = now
        self.phase = phase
        self._since = now
        if phase in VERIFY_PHASES:
            self._pass_done = 0
        self._sample(now)

    def on_progress(self, phase: str, done: int, total: int | None, now: float) -> None:
        if self.started is None:
            self.started = now
        if phase in VERIFY_PHASES:
            if not self.writes and total is not None:
                self.pass_size = total
            if done < self._pass_done:  # a new pass without its phase event
                self._pass_done = 0
            self.verified += done - self._pass_done
            self._pass_done = done
        else:
            if total is not None:
                self.pass_size = total
            self.written = max(self.written, done)
        self._sample(now)

    def on_end(self, status: str, now: float, written: int | None = None) -> None:
        """The drive ended: ``written`` (bytes written plus skipped) fixes an unknown size."""
        if self.ended is not None:
            return
        self._close_phase(now)
        self.ended = status
        self.finished = now
        if written is not None:
            self.written = max(self.written, written)
        self._sample(now)
        if status == "ok":
            if self.pass_size is None:
                self.pass_size = self.written
            total = self.total
            if total is not None:
                self._shown = total

    def _close_phase(self, now: float) -> None:
        if self._since is not None and self.phase is not None:
            spent = max(0.0, now - self._since)
            if self.phase in WRITE_PHASES:
                self.write_time += spent
            elif self.phase in VERIFY_PHASES:
                self.verify_time += spent
        self._since = None

    def _sample(self, now: float) -> None:
        raw = self._raw_done()
        total = self.total
        if total is not None:
            raw = min(raw, total if self.ended == "ok" else max(total - 1, 0))
        self._shown = max(self._shown, raw)
        self._samples.append((now, self._shown))
        while len(self._samples) > 2 and now - self._samples[1][0] >= SPEED_WINDOW:
            self._samples.popleft()

    # Reading

    def _raw_done(self) -> int:
        size = self.pass_size
        written = self.written if self.writes else 0
        verified = self.verified if self.verifies else 0
        if size is not None:
            written, verified = min(written, size), min(verified, size)
        return written + verified

    @property
    def total(self) -> int | None:
        if self.pass_size is None:
            return None
        return self.pass_size * (int(self.writes) + int(self.verifies))

    @property
    def done(self) -> int:
        return self._shown

    @property
    def pass_done(self) -> int:
        """Bytes of the current pass (written, then verified): what the byte counts show."""
        if self.ended == "ok" and self.pass_size is not None:
            return self.pass_size
        if self.verifies and (self.phase in VERIFY_PHASES or not self.writes):
            return min(self.verified, self.pass_size or self.verified)
        return self.written

    @property
    def fraction(self) -> float | None:
        total = self.total
        if total is None:
            return None
        return 1.0 if total == 0 else min(1.0, self.done / total)

    def speed(self, now: float) -> float | None:
        """Bytes per second over the last few seconds; None until there are two samples."""
        if self.ended is not None:
            return None
        samples = self._samples
        if not samples or self.started is None:
            return None
        t0, d0 = samples[0]
        span = now - t0
        if span < 0.5:
            return None
        return max(0.0, (self.done - d0) / span)

    def eta(self, now: float) -> float | None:
        total, speed = self.total, self.speed(now)
        if total is None or not speed:
            return None
        return max(0.0, (total - self.done) / speed)

    @property
    def write_speed(self) -> float | None:
        """Average over the writing phases: bytes written (or found identical) per second."""
        return self.written / self.write_time if self.write_time > 0 and self.written else None

    @property
    def verify_speed(self) -> float | None:
        return self.verified / self.verify_time if self.verify_time > 0 and self.verified \
            else None

    @property
    def average_speed(self) -> float | None:
        """What a finished row shows: its write speed, or its read speed for ``verify``."""
        return self.write_speed if self.writes else self.verify_speed


# ----------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class Row:
    """What one row says, before it is fitted to a width."""

    name: str
    state: str  # one word: writing, verifying, done, failed...
    port: str = ""
    label: str = ""
    fraction: float | None = None  # None: unknown total (a pulsing bar)
    done: int = 0  # bytes of the current pass (written, or verified), of the image's ``total``
    total: int | None = None
    speed: str = ""  # "23.4 MB/s", or the average once finished
    eta: str = ""  # "0:12", or "avg"
    detail: str = ""  # on a line of its own under the row, unless ``long`` fits on the row
    long: str = ""  # the state with its detail, when there is room (default "state: detail")
    style: str = ""  # the state's (and the bar's) style: green, red, yellow, dim
    bar: bool = True
    pulse: int = 0  # the pulsing bar's position


@dataclass(frozen=True)
class Piece:
    text: str
    style: str = ""


Line = tuple[Piece, ...]

#: Below this, optional columns (bytes, label, inline detail) give way to the bar.
MIN_BAR = 10
ROOMY_BAR = 20
MAX_NAME = 16
MAX_PORT = 9
MAX_LABEL = 24


def format_speed(speed: float | None) -> str:
    return "" if speed is None else f"{format_size(int(speed))}/s"


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds + 0.5)
    if s >= 100 * 3600:
        return ">99h"
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _amount(row: Row) -> str:
    """Percent when the total is known, else the bytes done (never an invented 0%)."""
    if not row.bar:
        return ""
    if row.fraction is not None:
        return f"{int(row.fraction * 100 + 1e-9):d}%"
    return format_size(row.done) if row.done else ""


def _bytes(row: Row) -> str:
    if row.total is None or not row.bar:
        return ""
    return f"{format_size(row.done)}/{format_size(row.total)}"


def _cut(text: str, width: int) -> str:
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _bar(row: Row, width: int) -> Line:
    style = row.style or "bar.complete"
    if not row.bar or width <= 0:
        return (Piece(" " * max(width, 0)),)
    if row.fraction is None:  # unknown total: a short segment moving along the bar
        seg = max(1, width // 5)
        start = row.pulse % max(1, width)
        cells = ["─"] * width
        for i in range(seg):
            cells[(start + i) % width] = "━"
        return (Piece("".join(cells), "bar.pulse"),)
    full = int(row.fraction * width + 1e-9)
    return (Piece("━" * full, style), Piece("─" * (width - full), "bar.back"))


def layout(rows: Sequence[Row], width: int) -> list[Line]:
    """Every row's lines, one after the other (see :func:`layout_rows`)."""
    return [line for block in layout_rows(rows, width) for line in block]


def fit_height(blocks: Sequence[Sequence[Line]], finished: Sequence[bool], height: int
               ) -> tuple[list[Sequence[Line]], int]:
    """The rows that fit in ``height`` lines, and how many finished rows were left out.

    Finished rows go first, oldest first: the drives being written (and the newest arrivals
    in a duplicator session) stay on screen; the table at the end lists every drive.
    """
    keep = list(range(len(blocks)))
    used = sum(len(b) for b in blocks)
    dropped = 0
    for i in range(len(blocks)):
        if used <= height:
            break
        if finished[i]:
            keep.remove(i)
            used -= len(blocks[i])
            if dropped == 0:
                used += 1  # the line saying how many are left out
            dropped += 1
    return [blocks[i] for i in keep], dropped


def layout_rows(rows: Sequence[Row], width: int) -> list[list[Line]]:
    """Each row as one line of at most ``width`` cells, plus its detail's lines when needed.

    Always kept, in this order: name, state, bar, percent (or bytes), speed, ETA.  The port,
    byte counts and the drive's label come and go with the width; the detail (an error, what
    to do next) sits beside the state when there is room and goes under the row when not.
    The columns are aligned across rows; nothing is ever wider than ``width``.
    """
    if not rows:
        return []
    width = max(width, 20)
    name_w = min(MAX_NAME, max(len(r.name) for r in rows))
    port_w = min(MAX_PORT, max(len(r.port) for r in rows))
    amount_w = max(4, *(len(_amount(r)) for r in rows))
    speed_w = max(len(r.speed) for r in rows)
    eta_w = max(len(r.eta) for r in rows)
    state_w = max(len(r.state) for r in rows)
    bytes_w = max(len(_bytes(r)) for r in rows)
    label_w = min(MAX_LABEL, max(len(r.label) for r in rows))
    longs = [_long(r) for r in rows]
    detail_w = max((len(t) for r, t in zip(rows, longs, strict=True) if r.detail), default=0)

    def fixed(name: int, port: int, label: int, nbytes: int, speed: int, eta: int,
              state: int) -> int:
        return sum(w + 1 for w in (name, port, label, amount_w, nbytes, speed, eta) if w) + state

    # The essentials first; shrink the name, then drop ETA and speed, only when nothing else fits.
    plan = dict(name=name_w, port=0, label=0, nbytes=0, speed=speed_w, eta=eta_w,
                state=state_w)
    names = [r.name for r in rows]
    for shrink in ("name", "eta", "speed"):
        if width - fixed(**plan) - 1 >= MIN_BAR:
            break
        if shrink == "name":  # "loop12" rather than "/dev/lo…": names stay distinct
            names = [_short(n) for n in names]
            plan["name"] = min(max(len(n) for n in names),
                               max(8, width - MIN_BAR - 1 - fixed(**{**plan, "name": 0})))
        else:
            plan[shrink] = 0
    # Then the extras, as long as the bar stays roomy.
    for extra, w in (("port", port_w), ("nbytes", bytes_w), ("label", label_w)):
        if w and width - fixed(**{**plan, extra: w}) - 1 >= ROOMY_BAR:
            plan[extra] = w
    inline = bool(detail_w) and width - fixed(**{**plan, "state": detail_w}) - 1 >= ROOMY_BAR
    if inline:
        plan["state"] = max(state_w, detail_w)
    bar_w = max(0, width - fixed(**plan) - 1)

    blocks: list[list[Line]] = []
    for r, long, name in zip(rows, longs, names, strict=True):
        lines: list[Line] = []
        blocks.append(lines)
        pieces: list[Piece] = [Piece(_cut(name, plan["name"]).ljust(plan["name"]), "bold"),
                               Piece(" ")]
        if plan["port"]:
            pieces += [Piece(_cut(r.port, plan["port"]).ljust(plan["port"]), "cyan"),
                       Piece(" ")]
        if plan["label"]:
            pieces += [Piece(_cut(r.label, plan["label"]).ljust(plan["label"]), "dim"),
                       Piece(" ")]
        pieces += [*_bar(r, bar_w), Piece(" "), Piece(_amount(r).rjust(amount_w)), Piece(" ")]
        for key, text in (("nbytes", _bytes(r)), ("speed", r.speed), ("eta", r.eta)):
            if plan[key]:
                pieces += [Piece(text.rjust(plan[key])), Piece(" ")]
        state = long if inline and r.detail else r.state
        pieces.append(Piece(_cut(state, plan["state"]).ljust(plan["state"]), r.style))
        lines.append(_trim(pieces, width))
        if r.detail and not inline:
            wrapped = textwrap.wrap(r.detail, max(10, width - 4), max_lines=3, placeholder=" …")
            for i, text in enumerate(wrapped):
                lines.append((Piece("    " if i else "  ↳ ", "dim"), Piece(text, r.style)))
    return blocks


def _short(name: str) -> str:
    return name.removeprefix("/dev/")


def _long(row: Row) -> str:
    if not row.detail:
        return row.state
    return row.long or f"{row.state}: {row.detail}"


def _trim(pieces: Sequence[Piece], width: int) -> Line:
    """The pieces without trailing blanks, cut to ``width`` cells as a last resort."""
    out: list[Piece] = []
    used = 0
    for p in pieces:
        room = width - used
        if room <= 0:
            break
        text = p.text[:room]
        out.append(Piece(text, p.style))
        used += len(text)
    while out and not out[-1].text.rstrip():
        out.pop()
    if out:
        out[-1] = Piece(out[-1].text.rstrip(), out[-1].style)
    return tuple(out)


def plain(line: Line) -> str:
    return "".join(p.text for p in line)
