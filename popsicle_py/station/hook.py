"""``--hook CMD``: a command run for each drive that ends (a sound, a light, a label printer).

The command is split like a shell line (no shell runs it) and told about the drive in its
environment: ``POPSICLE_SLOT``, ``POPSICLE_DEVICE``, ``POPSICLE_RESULT`` (ok, failed,
invalid, cancelled), ``POPSICLE_SERIAL``, ``POPSICLE_MODEL``, ``POPSICLE_ERROR``.  Each runs
on its own thread, at most :data:`HOOK_SECONDS`: a hook never holds up a drive or the page.
The station waits for the hooks still running before it exits.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
from collections.abc import Callable

from popsicle_py import events

HOOK_SECONDS = 30.0


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
        self.threads: list[threading.Thread] = []
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
            self.threads = [t for t in self.threads if t.is_alive()] + [thread]
            thread.start()

    def _run(self, env: dict[str, str]) -> None:
        try:
            done = subprocess.run(self.argv, env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, timeout=HOOK_SECONDS,
                                  check=False)
            why = f"exited with {done.returncode}" if done.returncode else None
        except subprocess.TimeoutExpired:
            why = f"still running after {HOOK_SECONDS:.0f} s; stopped"
        except OSError as exc:
            why = exc.strerror or str(exc)
        if why is not None and not self._warned:
            self._warned = True  # once: a broken hook must not flood the log
            self.warn(f"--hook {shlex.join(self.argv)}: {why}; the drives go on")

    def join(self) -> None:
        for thread in self.threads:
            thread.join(HOOK_SECONDS + 5)
