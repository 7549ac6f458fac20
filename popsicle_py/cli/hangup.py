"""A terminal that goes away (an ssh connection dropped, its window closed) is a hang-up.

SIGHUP stops the run like any stop signal (:mod:`popsicle_py.signals`).  But the terminal can
be gone with no SIGHUP handled first (nohup, or our write came before the signal): a write to
it then fails with EIO, from whatever event was being shown.  :class:`HangUpView` takes that
EIO as the hang-up it is: the run is cancelled as by SIGHUP (the drives stop and are closed,
exit 129), and from then on what was meant for the terminal goes to /dev/null, so that the
summary, the last lines and Python's own flush at exit cannot turn a hang-up into a crash.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal

from popsicle_py.events import WatchEvent
from popsicle_py.protocols import View
from popsicle_py.signals import Cancellation


def silence_terminal() -> None:
    """Point standard output and error, where they are a terminal, at /dev/null."""
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                if os.isatty(fd):
                    os.dup2(null, fd)
    finally:
        os.close(null)


class HangUpView:
    """A view whose terminal may hang up: EIO from it cancels the run as SIGHUP does."""

    def __init__(self, view: View, cancel: Cancellation) -> None:
        self.view = view
        self.cancel = cancel
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
        silence_terminal()
        self.cancel.request(signal.SIGHUP)
