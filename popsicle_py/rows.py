"""Drive rows laid out to fit the terminal's width.

Pure code over plain data, for the live views.  The progress measure behind a row (bytes,
speeds) is in :mod:`popsicle_py.progress`, re-exported here for the code that imports it from
this module.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence

from rich.cells import cell_len, chop_cells, set_cell_size

from popsicle_py.progress import SPEED_WINDOW, VERIFY_PHASES, WRITE_PHASES, DriveProgress
from popsicle_py.records import record
from popsicle_py.units import format_size

__all__ = ["COLUMNS", "FITS", "SPEED_WINDOW", "VERIFY_PHASES", "WRITE_PHASES", "Column",
           "DriveProgress", "Fit", "Line", "Piece", "Row", "byte_counts", "fit_height", "fold",
           "format_eta",
           "format_speed", "layout", "layout_rows", "plain"]


# ----------------------------------------------------------------------------------------------
# Layout


@record
class Row:
    """What one row says, before it is fitted to a width."""

    name: str
    state: str  # one word: writing, verifying, done, failed...
    port: str = ""
    label: str = ""
    link: str = ""  # the USB link's speed ("480 Mbit/s"), shown when the width allows
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
    moving: bool = True  # False: an unknown total that will not grow (ended): no pulse
    pass_word: str = ""  # what the byte counts are ("written", "verified", "received")


@record
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
MAX_LINK = 11


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


def byte_counts(row: Row) -> str:
    """``written 34.1/58.5 MiB``: the pass's bytes, named when the row says which pass."""
    if row.total is None or not row.bar:
        return ""
    done, total = format_size(row.done), format_size(row.total)
    if not row.pass_word:
        return f"{done}/{total}"
    number, _, unit = done.partition(" ")
    if unit and total.endswith(" " + unit):  # one unit for both: "34.1/58.5 MiB"
        done = number
    return f"{row.pass_word} {done}/{total}"


def _cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` cells (a wide character, as in Chinese, takes two)."""
    if width <= 0:
        return ""
    return text if cell_len(text) <= width else set_cell_size(text, width - 1) + "…"


def _fill(text: str, width: int, *, right: bool = False) -> str:
    """``text`` padded to ``width`` cells, on the left when ``right``."""
    pad = " " * max(0, width - cell_len(text))
    return pad + text if right else text + pad


def _bar(row: Row, width: int) -> Line:
    style = row.style or "bar.complete"
    if not row.bar or width <= 0:
        return (Piece(" " * max(width, 0)),)
    if row.fraction is None and not row.moving:  # unknown total, ended: an empty bar
        return (Piece("─" * width, "bar.back"),)
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

    Finished rows go first, oldest first; rows still being worked on are never left out (see
    :func:`fold` for the live view's rules, which also keep failed rows).
    """
    kept, folded = fold(blocks, ["ok" if f else "keep" for f in finished], height)
    return kept, folded.get("ok", 0)


#: What a row is to the fold: shown whatever happens, folded first, or folded last.
KEEP, OK, BUSY = "keep", "ok", "busy"


def fold(blocks: Sequence[Sequence[Line]], kinds: Sequence[str], height: int
         ) -> tuple[list[Sequence[Line]], dict[str, int]]:
    """The rows that fit in ``height`` lines (one of them the line that counts the others).

    A row that ended ok (``OK``) folds first, oldest first: it has nothing more to say, and
    the table at the end lists it.  A failed or cancelled row and the image (``KEEP``) never
    fold; when they and the rows still at work do not fit, their detail lines are cut to one,
    then rows at work (``BUSY``) fold from the bottom.  Returns the kept blocks, in order, and
    how many of each kind were folded.
    """
    shown: list[list[Line] | None] = [list(b) for b in blocks]
    folded: dict[str, int] = {}

    def over() -> bool:
        used = sum(len(b) for b in shown if b is not None)
        return used + bool(folded) > height

    order = [i for i, k in enumerate(kinds) if k == OK] + [None]
    order += [i for i in reversed(range(len(kinds))) if kinds[i] == BUSY]
    for i in order:
        if not over():
            break
        if i is None:  # before a row at work goes: details shortened to one line
            for block in shown:
                if block is not None:
                    del block[2:]
            continue
        shown[i] = None
        folded[kinds[i]] = folded.get(kinds[i], 0) + 1
    return [b for b in shown if b is not None], folded


@record
class Column:
    """One column of a row: its text, where it sits, how wide it may grow, its style."""

    key: str
    cell: Callable[[Row], str]
    style: Callable[[Row], str] = lambda row: ""
    right: bool = False  # numbers are right-aligned (and never cut: they are measured)
    most: int | None = None  # longer texts are cut with "…"
    least: int = 0
    kept: bool = False  # on every line, whatever the width (the others come and go)


@record
class Fit:
    """One step of fitting the columns to a width: ``shorten``, ``drop``, ``add`` or ``widen``
    the column ``key`` according as the bar keeps at least ``bar`` cells."""

    key: str
    action: str
    bar: int


#: The columns in the order of the line; the bar sits between the label and the percent.
COLUMNS: tuple[Column, ...] = (
    Column("name", lambda r: r.name, lambda r: "bold", most=MAX_NAME, kept=True),
    Column("port", lambda r: r.port, lambda r: "cyan", most=MAX_PORT),
    Column("label", lambda r: r.label, lambda r: "dim", most=MAX_LABEL),
    Column("link", lambda r: r.link, lambda r: "dim", most=MAX_LINK),
    Column("bar", lambda r: "", kept=True),
    Column("amount", lambda r: _amount(r), right=True, least=4, kept=True),
    Column("nbytes", lambda r: byte_counts(r), right=True),
    Column("speed", lambda r: r.speed, right=True),
    Column("eta", lambda r: r.eta, right=True),
    Column("state", lambda r: r.state, lambda r: r.style, kept=True),
)
#: Shown from the start (the essentials); the other columns come only when ``FITS`` adds them.
ESSENTIAL = ("name", "amount", "speed", "eta", "state")
#: The priority table, applied in order.  First the essentials give way while the bar would be
#: under MIN_BAR cells: the name loses its "/dev/" ("loop12" rather than "/dev/lo…": names stay
#: distinct), then the ETA goes, then the speed.  Then the extras come, each only if the bar
#: stays ROOMY_BAR wide: the port, the byte counts, the label.  Last, the detail (an error, what
#: to do next) goes beside the state if the bar stays roomy, else on lines under the row.
FITS: tuple[Fit, ...] = (
    Fit("name", "shorten", MIN_BAR),
    Fit("eta", "drop", MIN_BAR),
    Fit("speed", "drop", MIN_BAR),
    Fit("port", "add", ROOMY_BAR),
    Fit("nbytes", "add", ROOMY_BAR),
    Fit("label", "add", ROOMY_BAR),
    Fit("link", "add", ROOMY_BAR),
    Fit("state", "widen", ROOMY_BAR),
)
#: A shortened name keeps at least this many cells.
MIN_NAME = 8


class _Plan:
    """The columns' texts and widths for a set of rows at one width (0: not shown)."""

    def __init__(self, rows: Sequence[Row], width: int, floors: dict[str, int]) -> None:
        self.width = width
        self.cells = {c.key: [c.cell(r) for r in rows] for c in COLUMNS}
        self.natural = {c.key: max(_widest(self.cells[c.key], c), floors.get(c.key, 0))
                        for c in COLUMNS}
        self.widths = {c.key: self.natural[c.key] if c.key in ESSENTIAL else 0
                       for c in COLUMNS}
        longs = [_long(r) for r in rows]
        self.details = [t if r.detail else "" for r, t in zip(rows, longs, strict=True)]
        self.inline = False

    def bar(self, **change: int) -> int:
        """The bar's width with these columns' widths (and ``change`` applied)."""
        widths = {**self.widths, **change}
        used = sum(w + 1 for k, w in widths.items() if w and k not in ("bar", "state"))
        return self.width - used - widths["state"] - 1

    def apply(self, fit: Fit) -> None:
        {"shorten": self._shorten, "drop": self._drop, "add": self._add,
         "widen": self._widen}[fit.action](fit.key, fit.bar)

    def _shorten(self, key: str, bar: int) -> None:
        if self.bar() < bar:
            self.cells[key] = [_short(t) for t in self.cells[key]]
            room = self.bar(**{key: 0}) - bar  # what the bar leaves it
            self.widths[key] = min(max(map(cell_len, self.cells[key])), max(MIN_NAME, room))

    def _drop(self, key: str, bar: int) -> None:
        if self.bar() < bar:
            self.widths[key] = 0

    def _add(self, key: str, bar: int) -> None:
        natural = self.natural[key]
        if natural and self.bar(**{key: natural}) >= bar:
            self.widths[key] = natural

    def _widen(self, key: str, bar: int) -> None:
        """The detail beside the state, when the bar stays wide enough."""
        detail = max(map(cell_len, self.details))
        if detail and self.bar(**{key: detail}) >= bar:
            self.inline = True
            self.widths[key] = max(self.widths[key], detail)
            self.cells[key] = [d or s for d, s in zip(self.details, self.cells[key], strict=True)]


def _widest(texts: Sequence[str], column: Column) -> int:
    widest = max(column.least, *map(cell_len, texts))
    return widest if column.most is None else min(column.most, widest)


def layout_rows(rows: Sequence[Row], width: int, floors: dict[str, int] | None = None
                ) -> list[list[Line]]:
    """Each row as one line of at most ``width`` cells, plus its detail's lines when needed.

    Always kept, in this order: name, state, bar, percent (or bytes), speed, ETA.  The port,
    byte counts and the drive's label come and go with the width (the table ``FITS`` says
    how); the detail sits beside the state when there is room and goes under the row when
    not.  The columns are aligned across rows; nothing is ever wider than ``width``.
    ``floors`` are the least widths of columns (a live view keeps its columns from frame to
    frame: a speed that comes and goes does not move the bar).
    """
    if not rows:
        return []
    plan = _Plan(rows, max(width, 20), floors or {})
    for fit in FITS:
        plan.apply(fit)
    bar_w = max(0, plan.bar())
    return [[_line(plan, i, r, bar_w), *_under(plan, r)] for i, r in enumerate(rows)]


def _line(plan: _Plan, i: int, row: Row, bar_w: int) -> Line:
    """Row ``i``'s line: its columns that the plan shows, cut to the width."""
    pieces: list[Piece] = []
    for column in COLUMNS:
        w, text = plan.widths[column.key], plan.cells[column.key][i]
        if column.key == "bar":
            pieces += [*_bar(row, bar_w), Piece(" ")]
        elif column.right and (w or column.kept):
            pieces += [Piece(_fill(text, w, right=True)), Piece(" ")]
        elif w or column.kept:
            pieces += [Piece(_fill(_cut(text, w), w), column.style(row)), Piece(" ")]
    return _trim(pieces[:-1], plan.width)


def _under(plan: _Plan, row: Row) -> list[Line]:
    """The detail's lines under the row, when it is not beside the state."""
    if not row.detail or plan.inline:
        return []
    wrapped = _wrap(row.detail, max(10, plan.width - 4))
    return [(Piece("    " if j else "  ↳ ", "dim"), Piece(text, row.style))
            for j, text in enumerate(wrapped)]


def _wrap(text: str, width: int, lines: int = 3) -> list[str]:
    """``text`` in at most ``lines`` lines of ``width`` cells, the last ending " …" if cut."""
    if text.isascii():  # a cell a character
        return textwrap.wrap(text, width, max_lines=lines, placeholder=" …")
    out: list[str] = []
    for word in text.split():
        if out and cell_len(out[-1]) + 1 + cell_len(word) <= width:
            out[-1] += " " + word
        else:
            out += chop_cells(word, width)
    if len(out) > lines:
        out = [*out[: lines - 1], set_cell_size(out[lines - 1], width - 2).rstrip() + " …"]
    return out


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
        text = p.text if cell_len(p.text) <= room else set_cell_size(p.text, room)
        out.append(Piece(text, p.style))
        used += cell_len(text)
    while out and not out[-1].text.rstrip():
        out.pop()
    if out:
        out[-1] = Piece(out[-1].text.rstrip(), out[-1].style)
    return tuple(out)


def plain(line: Line) -> str:
    return "".join(p.text for p in line)
