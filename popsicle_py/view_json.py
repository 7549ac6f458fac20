"""The views that need no Rich: a script's JSON lines, and the output stream every view writes to.

Kept apart from :mod:`popsicle_py.view` so that ``--json`` does not import Rich (a fifth of
the start-up before the first write); :mod:`popsicle_py.view` re-exports them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import stat
import sys
import time
from typing import IO

from popsicle_py import events
from popsicle_py.signals import say_on_stderr

#: JSON output sends a drive's progress at most this often (results are never held back).
JSON_INTERVAL = 0.5


def printable(text: str, *, newlines: bool = False) -> str:
    """``text`` as it may reach a terminal or a log: every character that is not printable
    shown as its escape (``\\x1b``, ``\\u202e``; a byte of a name that is not UTF-8 as
    ``\\xff``).

    File names, mount points and a drive's model string are anybody's: an escape sequence in
    one could retitle the terminal, hide the lines after it (the drives about to be
    overwritten) or move the cursor to draw over them; a newline would forge a line of a
    log; a byte that is not UTF-8 would fail the write to a strict UTF-8 terminal.
    ``newlines`` keeps line breaks (a message of several lines).
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or (newlines and ch == "\n") else _escape(ch)
                   for ch in text)


_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as Python decodes file names
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class Out:
    """A view's output stream.  When the reader goes away (``| head -1``), it stops writing.

    The drives are worth more than the log: a run whose output pipe closes finishes every
    drive, and its exit status still tells the truth.  A broken pipe is "the reader left",
    never an error of the flash: every later write, and the interpreter's own flush at exit,
    go quietly to /dev/null.

    Nor does a reader that stops reading (``| less`` left on its first page, a program that
    reads its child's output only at the end) hold the run: the thread that writes here is
    the one that judges the drives, and blocked on a full pipe it judged them stalled when
    the reader came back.  Into a pipe, a socket or a terminal, text is written only as far
    as it goes without blocking; the rest waits in memory, in order, and a ``droppable``
    text (progress, which the next progress says again) is dropped while some waits.
    :meth:`close` writes what waits at the reader's pace: the run is over by then.  After a
    signal (:meth:`interrupted`), a reader that takes nothing for ``GIVE_UP`` seconds loses
    the rest: Ctrl-C gives the shell back, and the exit status says how the run ended.
    """

    #: Seconds a reader may take nothing, once a signal came, before the rest is dropped.
    GIVE_UP = 3.0

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.prefix = ""  # put before each line written (a station's ``[slot A3] ``)
        self.gone = self.stream is None  # stdout closed at start (``>&-``): nowhere to write
        self._fd = _pollable(self.stream)
        self._waiting: list[str] = []
        self._signalled = False

    def write(self, text: str, *, droppable: bool = False) -> None:
        if self.gone or self.stream is None:
            return
        if self.prefix:
            text = "".join(self.prefix + line for line in text.splitlines(keepends=True))
        if self._fd is None:
            self._put(text)
            return
        self._drain()
        if self._waiting and droppable:
            return
        self._waiting.append(text)
        self._drain()

    def _drain(self) -> None:
        """What waits, in pieces that a pipe with room takes whole (a page: no blocking)."""
        while self._waiting and not self.gone and self._ready():
            text = self._waiting.pop(0)
            if len(text) > _PIECE:
                self._waiting.insert(0, text[_PIECE:])
            self._put(text[:_PIECE])  # a reader that left: nothing waits any more

    def interrupted(self) -> None:
        """A signal came (called from its handler: only a flag is set)."""
        self._signalled = True

    def _ready(self, wait: float = 0) -> bool:
        if self._fd is None:
            return True
        try:
            return bool(select.select([], [self._fd], [], wait)[1])
        except (OSError, ValueError):  # closed meanwhile: the write says how
            return True

    def _put(self, text: str) -> None:
        assert self.stream is not None
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            self.reader_left()
        except (OSError, ValueError) as exc:  # a full disk under a log file, a closed stream
            self.reader_left()
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            with contextlib.suppress(OSError, ValueError, AttributeError):
                print(f"popsicle-py: cannot write the output ({why}); the exit status still says "
                      "how the run ended", file=sys.stderr, flush=True)

    def reader_left(self) -> None:
        self.gone = True
        self._waiting.clear()
        if self.stream is None:
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        # A stream with no descriptor of its own (the station's slot prefixer) is no reason
        # to crash: the run goes on, and only its output is lost.
        with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
            os.dup2(devnull, self.stream.fileno())  # so that the exit's own flush is quiet
        os.close(devnull)

    def close(self) -> None:
        """Write what waits, however long the reader takes (the summary is the last line),
        unless a signal came and the reader has taken nothing for ``GIVE_UP`` seconds."""
        stuck: float | None = None
        while self._waiting and not self.gone:
            if self._ready(0.1):
                self._drain()
                stuck = None
            elif self._signalled:
                stuck = stuck if stuck is not None else time.monotonic()
                if time.monotonic() - stuck >= self.GIVE_UP:
                    with contextlib.suppress(OSError, ValueError, AttributeError):
                        print("popsicle-py: the output's reader takes nothing: the rest of "
                              "the output is dropped", file=sys.stderr, flush=True)
                    self.reader_left()
        if not self.gone and self.stream is not None:
            self._put("")  # flushed; a failed write said


#: The most characters written at once into a pipe with room: at most 10 bytes each (an
#: escape that the locale needs, ``\\U0001f600``), so within the page it has free.
_PIECE = 400


def _pollable(stream: IO[str] | None) -> int | None:
    """The descriptor of a pipe, socket or terminal, where a write can block; else None."""
    try:
        fd = stream.fileno() if stream is not None else -1
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return None
    return fd if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) else None


def write_out(text: str, stream: IO[str] | None = None) -> None:
    """Write one line or more to stdout (or ``stream``); a reader that left is no error."""
    out = Out(stream)
    out.write(text)
    out.close()


class JsonView:
    """One JSON object per line, flushed as it happens; the summary is always last."""

    def __init__(self, out: IO[str] | None = None, interval: float = JSON_INTERVAL) -> None:
        self.out = Out(out)
        self.interval = interval
        self._last: dict[tuple[str | None, str], float] = {}

    def handle(self, event: events.WatchEvent) -> None:
        if self.out.gone:
            return
        if isinstance(event, events.Progress):
            key = (event.device, event.phase)
            now = time.monotonic()
            complete = event.total is not None and event.done >= event.total
            if not complete and now - self._last.get(key, 0.0) < self.interval:
                return
            self._last[key] = now
        self.out.write(json.dumps(event.to_json()) + "\n",
                       droppable=isinstance(event, events.Progress))

    def close(self) -> None:
        self.out.close()

    def announce(self, text: str) -> None:
        """A signal's news goes to stderr: stdout is for events only."""
        self.out.interrupted()
        say_on_stderr(text)
