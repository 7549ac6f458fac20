"""What the CLI shows a person before and while it runs: the confirmation, and the view."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from popsicle_py import events
from popsicle_py.errors import Refused
from popsicle_py.units import format_size

if TYPE_CHECKING:
    from rich.console import Console

    from popsicle_py.app.confirm import Confirmation
    from popsicle_py.protocols import View


def require_terminal() -> None:
    """A script that forgot --yes must never write: no terminal, no question, no writing.

    A closed standard input (``<&-``: ``sys.stdin`` is None) is no terminal either; so is a
    closed standard error, where the drives about to be lost could not be shown: both are
    refusals (exit 2), not an unexpected error.
    """
    if sys.stdin is None or not sys.stdin.isatty():
        raise Refused(["refusing to write without confirmation: standard input is not a "
                       "terminal; pass --yes to confirm in scripts"])
    if sys.stderr is None:
        raise Refused(["cannot show the confirmation (standard error is closed): nothing "
                       "was written; pass --yes to confirm in scripts"])


def confirm(confirmation: Confirmation, yes: bool) -> None:
    """Show what will be overwritten and ask once; without a terminal, refuse unless --yes."""
    if yes:
        return
    require_terminal()
    try:
        _show(confirmation)
        answer = _yes_or_no(confirmation.question)
    except OSError as exc:  # stderr gone (a reader that left): no question without the list
        raise Refused([f"cannot show the confirmation ({exc.strerror or exc}): nothing was "
                       "written"]) from exc
    except (KeyboardInterrupt, click.Abort):
        click.echo(err=True)  # ^C or end of input: what follows goes below the prompt's line
        raise
    if not answer:
        raise Refused(["cancelled at the confirmation: nothing was written"])


def _yes_or_no(question: str) -> bool:
    """``QUESTION [y/N]: `` on stderr, until an answer; end of input is :class:`click.Abort`.

    Read with ``select`` beside the signals' wakeup pipe, not with ``input()``: a signal that
    came between the question's showing and the read (a service manager's SIGTERM, a Ctrl-C
    as the question appeared) was handled in C and left the read blocked, the stop unheard
    until the person pressed Enter (one SIGTERM in three at the question, in a test).
    """
    while True:
        click.echo(f"{question} [y/N]: ", nl=False, err=True)
        answer = _read_line().strip().lower()
        if answer in ("y", "yes"):
            return True
        if answer in ("", "n", "no"):
            return False
        click.echo("Error: invalid input", err=True)


def _read_line() -> str:
    """A line typed on standard input (a terminal); a signal's handler runs as it comes."""
    import os
    import select
    import signal

    fd = sys.stdin.fileno()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        previous = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    except ValueError:  # not the main thread: no handler runs here anyway
        previous = None
    line = b""
    try:
        while not line.endswith(b"\n"):
            ready = select.select([fd, wake_r], [], [])[0]  # a handler runs on the way out
            if wake_r in ready:
                os.read(wake_r, 512)  # its handler ran and did not raise: ask on
            if fd in ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise click.Abort()  # end of input: no answer
                line += chunk
    finally:
        if previous is not None:
            signal.set_wakeup_fd(previous)
        os.close(wake_r)
        os.close(wake_w)
    return line.decode(sys.stdin.encoding or "utf-8", "replace")


def _show(confirmation: Confirmation) -> None:
    """What the question is about, on stderr: the drives, what they hold, the warnings."""
    from rich.table import Table

    from popsicle_py.live import ShownConsole

    console = ShownConsole(stderr=True)  # names are shown as they are, never as markup
    if confirmation.watch:
        console.print(confirmation.title)
        if confirmation.rows:
            table = Table(title="Plugged in now, and overwritten too (--include-present)",
                          title_justify="left")
            for column in ("Device", "Drive", "Size"):
                table.add_column(column, overflow="fold")
            for row in confirmation.rows:
                table.add_row(row.device, row.drive, format_size(row.size))
            console.print(table)
        for note in confirmation.notes:
            console.print(note)
        console.print(confirmation.warning, style="bold")
    else:
        table = Table(title=confirmation.title, title_justify="left")
        for column in ("Device", "Port", "Drive", "Size", "Mounted at", "Warnings"):
            table.add_column(column, overflow="fold")
        for row in confirmation.rows:
            table.add_row(row.device, row.port, row.drive, format_size(row.size),
                          ", ".join(row.mountpoints), "; ".join(row.warnings))
        console.print(table)
        for note in confirmation.notes:
            console.print(note)


def said_without_asking(confirmation: Confirmation) -> str:
    """With --yes nothing is asked, but the output still names what is written where."""
    devices = ", ".join(row.device for row in confirmation.rows)
    return f"{confirmation.title}: {devices}" if devices else confirmation.title


def make_view(as_json: bool, labels: dict[str, str], *, writes: bool = True) -> View:
    """JSON for scripts, live rows on a terminal, plain lines for logs and pipes."""
    if as_json:  # without Rich: a script's run starts sooner
        from popsicle_py.view_json import JsonView

        return JsonView()
    from popsicle_py import view

    console = _live_console()
    if console is not None:
        return view.RichView(console, labels, writes=writes)
    return view.PlainView()


class NotesAfterStart:
    """A JSON view that says the confirmation's notes (a drive ``--all-usb`` skipped, an
    image that does not look like a disk image, a slow USB link...) as ``note`` events:
    nothing showed them to a script, which was asked nothing.  They follow the ``start``
    event (a script may take the first line for it), or come before the summary of a run
    that ended before it started."""

    def __init__(self, view: View, notes: tuple[str, ...]) -> None:
        self.view = view
        self.notes = notes

    def handle(self, event: events.WatchEvent) -> None:
        if isinstance(event, events.Summary):
            self._say()
        self.view.handle(event)
        if isinstance(event, events.Started):
            self._say()

    def _say(self) -> None:
        notes, self.notes = self.notes, ()
        for note in notes:
            self.view.handle(events.Note(note))

    def close(self) -> None:
        self.view.close()

    def announce(self, text: str) -> None:
        self.view.announce(text)


def make_watch_view(as_json: bool, image: str, size: int | None, count: int | None,
                    verify: bool) -> View:
    """watch's views: a header with the session's counts on a terminal."""
    if as_json:  # without Rich: a script's run starts sooner
        from popsicle_py.view_json import JsonView

        return JsonView()
    from popsicle_py import view

    console = _live_console()
    if console is not None:
        return view.WatchView(console, image, size, count, verify=verify)
    return view.PlainView()


def _live_console() -> Console | None:
    """A console for live rows, or None for plain lines: stdout is no terminal, or one that
    cannot move its cursor (TERM=dumb), where Rich would show nothing until the run ends."""
    if sys.stdout is None or not sys.stdout.isatty():
        return None
    from popsicle_py.live import ShownConsole

    console = ShownConsole()
    return None if console.is_dumb_terminal else console
