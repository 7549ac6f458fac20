"""A terminal that goes away (an ssh connection dropped, its window closed) loses the output.

SIGHUP is the hang-up: it stops the run like any stop signal (:mod:`popsicle_py.signals`),
and a foreground run gets it (from the kernel, or from its shell).  A run that gets none was
told to outlive its terminal: ``nohup`` ignores SIGHUP, ``setsid`` and ``disown`` leave it
no terminal to hear it from.  Its writes to the vanished terminal then fail with EIO, from
whatever was being shown; :class:`HangUpView` takes that EIO as the end of the output only:
what was meant for the terminal goes to /dev/null from then on, so that the summary, the
last lines and Python's own flush at exit cannot turn it into a crash, and the run goes on.
A live view's rows do the same (:class:`popsicle_py.live.ShownConsole`).
"""

from __future__ import annotations

import errno

from popsicle_py.events import WatchEvent
from popsicle_py.files import silence_hung_up_terminal
from popsicle_py.protocols import View


class HangUpView:
    """A view whose terminal may go away: its EIO ends the output, not the run."""

    def __init__(self, view: View) -> None:
        self.view = view
        self.gone = False

    def handle(self, event: WatchEvent) -> None:
        if not self.gone:
            try:
                self.view.handle(event)
            except OSError as exc:
                self._hung_up(exc)

    def close(self) -> None:
        if not self.gone:
            try:
                self.view.close()
            except OSError as exc:
                self._hung_up(exc)

    def announce(self, text: str) -> None:
        self.view.announce(text)

    def _hung_up(self, exc: OSError) -> None:
        if exc.errno != errno.EIO:
            raise exc
        self.gone = True
        silence_hung_up_terminal()
