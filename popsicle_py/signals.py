"""Turn SIGINT, SIGTERM and SIGHUP into a cancel request the engine polls.

The first signal asks every worker to stop; the job then closes the drives and prints its
summary, and the command exits 128 + the signal's number.  A second signal while stopping
(Ctrl-C again, or a service manager's second SIGTERM) exits at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Process signals that a worker thread must never take.
MAIN_THREAD_SIGNALS = frozenset({*HANDLED, signal.SIGQUIT})
#: Run before a second signal quits at once (os._exit skips atexit): a terminal set back.
AT_QUIT: list[Callable[[], None]] = []


def say_on_stderr(text: str) -> None:
    """``popsicle-py: TEXT`` on stderr from a signal handler: one write call, no locks."""
    with contextlib.suppress(OSError):
        os.write(2, f"popsicle-py: {text}\n".encode())


def stopping_words(signum: int, *, idle: bool = False) -> str:
    """What a first signal says: what stops, and how to quit at once (in that signal's terms)."""
    name = signal.Signals(signum).name
    if idle:
        return f"{name}: ending the session (no drive is being written)"
    again = {signal.SIGINT: "Ctrl-C again", signal.SIGTERM: "another SIGTERM"}.get(
        signal.Signals(signum), "another signal")
    return f"{name}: stopping every drive ({again} to quit at once)"


class Cancellation:
    """Owns the cancel flag and remembers which signal set it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None
        #: Says "stopping" in place of a line on stderr: a live terminal view sets it, as a
        #: line written under a live display would make it draw its rows again below.  It
        #: runs in the signal handler, so it must only store the text (no I/O, no locks).
        self.announce: Callable[[str], None] | None = None
        #: True while no drive is being written (a watch session between sticks): the signal
        #: then ends the session rather than stopping drives.  Read in the signal handler.
        self.idle: Callable[[], bool] | None = None
        #: Files a job writes under a temporary name (see :meth:`removed_on_quit`): a second
        #: signal quits with os._exit, past every ``finally`` that would remove them.
        self._temporary: set[str] = set()

    def __call__(self) -> bool:
        return self._event.is_set()

    def request(self, signum: int | None = None) -> None:
        if self.signum is None:
            self.signum = signum
        self._event.set()

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, as shells report a death by signal."""
        return 128 + (self.signum or signal.SIGINT)

    @contextmanager
    def removed_on_quit(self, paths: Iterable[str]) -> Iterator[None]:
        """While inside, a second signal's quit at once removes ``paths`` (those that exist)
        first: a partial image as large as the drive is not left hidden beside OUTPUT."""
        names = set(paths)
        self._temporary |= names
        try:
            yield
        finally:
            self._temporary -= names

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self._event.is_set():  # asked twice: out now, as the user (or systemd) insists
            for undo in AT_QUIT:
                with contextlib.suppress(Exception):
                    undo()
            for name in tuple(self._temporary):  # a copy taken at once (lanes may change it)
                with contextlib.suppress(OSError):
                    os.unlink(name)
            os._exit(128 + signum)
        first = not self._event.is_set()
        # Set before saying so: a second Ctrl-C can run this handler again, nested, as soon
        # as the user reads the message, and must then find the run already stopping.
        self.request(signum)
        if first:
            text = stopping_words(signum, idle=self.idle is not None and self.idle())
            if self.announce is not None:
                self.announce(text)
                return
            with contextlib.suppress(OSError):
                os.write(2, f"popsicle-py: {text}\n".encode())

    @contextmanager
    def installed(self) -> Iterator[Cancellation]:
        """Handle the signals for the duration of a run, then restore the previous handlers.

        A signal the process was started ignoring stays ignored, as Python leaves an ignored
        SIGINT: ``nohup`` ignores SIGHUP so that the run outlives its terminal (a station
        left running at logout), a shell's background job ignores SIGINT.
        """
        previous = {s: signal.signal(s, self._handler) for s in HANDLED
                    if signal.getsignal(s) is not signal.SIG_IGN}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def keep_signals_for_main_thread() -> None:
    """Block the stop signals in the calling (worker) thread.

    The kernel hands a process signal to any thread that does not block it, and a thread
    stuck in a throttled O_DIRECT write cannot run even the C-level handler until the write
    returns: Ctrl-C would wait for the slowest drive.  Blocked here, the signal goes to the
    main thread, which runs Python's handlers anyway.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)


def hear_signals_on_main_thread() -> None:
    """Unblock the stop signals again on the main thread (a no-op on any other): it must
    take them, or Ctrl-C and SIGTERM stay pending for good.

    A library preloaded into the process can hand it a worker's mask: umockdev 0.17's
    preload (what the tests run under) saves and restores each thread's mask through one
    shared variable (its issue 252), so the main thread can end up with a lane's blocked
    set.  The waiting loops call this at each tick.
    """
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MAIN_THREAD_SIGNALS)
