"""``--hook CMD``: a command run for each drive that ends (a sound, a light, a label printer).

The command is split like a shell line (no shell runs it) and told about the drive in its
environment: ``POPSICLE_SLOT``, ``POPSICLE_DEVICE``, ``POPSICLE_RESULT`` (ok, failed,
invalid, cancelled), ``POPSICLE_SERIAL``, ``POPSICLE_MODEL``, ``POPSICLE_ERROR``.  Each runs
on its own thread, at most :data:`HOOK_SECONDS`: a hook never holds up a drive or the page.
The station waits for the hooks still running before it exits, and says so; a signal during
that wait (a second one, when a signal ended the session) ends them and the station at once.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable

from popsicle_py import events, signals
from popsicle_py.engine.supervisor import hear_signals_on_main_thread

HOOK_SECONDS = 30.0
#: How often the wait for the hooks looks at the signals.
POLL_SECONDS = 0.1


class HookError(Exception):
    """The hook command cannot be used (exit 2, nothing written)."""


def parse(command: str) -> list[str]:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise HookError(f"--hook {command!r}: {exc}") from None
    if not argv:
        raise HookError("--hook: the command is empty")
    return argv


class Hook:
    def __init__(self, argv: list[str], warn: Callable[[str], None]) -> None:
        self.argv = argv
        self.warn = warn
        self.threads: list[tuple[threading.Thread, float]] = []  # and when each started
        self.running: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._warned = False

    def environment(self, r: events.DriveResult, slot: str | None) -> dict[str, str]:
        info = r.drive or events.DriveInfo()
        return {"POPSICLE_SLOT": slot or "", "POPSICLE_DEVICE": r.device,
                "POPSICLE_RESULT": str(r.status), "POPSICLE_SERIAL": info.serial,
                "POPSICLE_MODEL": info.model, "POPSICLE_ERROR": r.error or ""}

    def handle(self, event: events.WatchEvent, slot: str | None) -> None:
        if isinstance(event, events.Result):
            env = {**os.environ, **self.environment(event.result, slot)}
            thread = threading.Thread(target=self._run, args=(env,), daemon=True,
                                      name="popsicle-station-hook")
            self.threads = [(t, at) for t, at in self.threads if t.is_alive()]
            self.threads.append((thread, time.monotonic()))
            thread.start()

    def _run(self, env: dict[str, str]) -> None:
        try:
            with subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL) as proc:
                with self._lock:
                    self.running.add(proc)
                try:
                    code = proc.wait(HOOK_SECONDS)
                    why = f"exited with {code}" if code else None
                except subprocess.TimeoutExpired:
                    proc.kill()
                    why = f"still running after {HOOK_SECONDS:.0f} s; stopped"
                finally:
                    with self._lock:
                        self.running.discard(proc)
        except OSError as exc:
            why = exc.strerror or str(exc)
        if why is not None and not self._warned:
            self._warned = True  # once: a broken hook must not flood the log
            self.warn(f"--hook {shlex.join(self.argv)}: {why}; the drives go on")

    def stop(self) -> None:
        """Kill the hooks still running (the station is quitting at once): no lock, as it
        may run in a signal handler."""
        for proc in list(self.running):
            with contextlib.suppress(OSError):
                proc.kill()

    def join(self, cancel: Callable[[], bool], say: Callable[[str], None]) -> None:
        """Wait for the hooks still running, saying how many and for how long at most; a
        signal that comes meanwhile ends them and the wait at once."""
        alive = [(t, at) for t, at in self.threads if t.is_alive()]
        if not alive:
            return
        deadline = max(at for _, at in alive) + HOOK_SECONDS + 1
        signalled = cancel()
        again = ("Ctrl-C again or another SIGTERM ends them now" if signalled
                 else "Ctrl-C or SIGTERM ends them now")
        left = math.ceil(max(0.0, deadline - time.monotonic()))
        say(f"waiting for {len(alive)} --hook command(s) still running, at most {left} s "
            f"({again})")
        signals.AT_QUIT.append(self.stop)
        try:
            for thread, _ in alive:
                while thread.is_alive() and time.monotonic() < deadline + 5:
                    hear_signals_on_main_thread()
                    if cancel() and not signalled:
                        self.stop()
                        return
                    thread.join(POLL_SECONDS)
        finally:
            signals.AT_QUIT.remove(self.stop)
