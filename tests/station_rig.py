"""The test side of tests/station_driver.py: a station under umockdev, and its HTTP API.

The driver runs under ``umockdev-wrapper`` (the system Python); the test talks to it over
pipes, reads the station's JSON events as they come, and talks HTTP to the station itself.
Waits are on the station's own events, never on sleeps.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import popsicle_cmd

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "station_driver.py"
SYSTEM_PYTHON = "/usr/bin/python3"
MiB = 1 << 20


def usb_stick(letter: str, port: int, size: int = 64 * MiB) -> str:
    """A USB stick's umockdev description (as tests/test_watch.py's Stick), in port 1-PORT."""
    from test_watch import Stick

    return Stick(letter, port, size).description


class Rig:
    """One testbed for the whole test; the station may be started, killed, started again."""

    def __init__(self, work: Path) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(["umockdev-wrapper", SYSTEM_PYTHON, str(DRIVER)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=work)
        self.cond = threading.Condition()
        self.lines: list[str] = []
        self.times: list[float] = []  # when each line arrived (time.monotonic())
        self.acks: dict[int, dict[str, Any]] = {}
        self.sent = 0
        self.cursor = 0
        self.url = ""
        self.token = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for text in self.proc.stdout:
            message = json.loads(text)
            with self.cond:
                if "line" in message:
                    self.lines.append(message["line"])
                    self.times.append(time.monotonic())
                elif "ack" in message:
                    self.acks[message["ack"]] = message
                self.cond.notify_all()
        with self.cond:
            self.acks[-1] = {}
            self.cond.notify_all()

    def command(self, step: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.sent += 1
        number = self.sent
        self.proc.stdin.write(json.dumps(step) + "\n")
        self.proc.stdin.flush()
        with self.cond:
            assert self.cond.wait_for(lambda: number in self.acks or -1 in self.acks, timeout)
            reply = self.acks.get(number)
        assert reply is not None, "the driver died"
        assert "error" not in reply, reply
        return reply

    # ------------------------------------------------------------------------------------

    def start(self, args: list[str], env: dict[str, str] | None = None,
              prefix: tuple[str, ...] = (), watching: bool = True) -> None:
        """Start ``popsicle-py station ARGS --json`` (after ``prefix``, a command that runs
        the rest) and wait for its URL (and, when ``watching``, for it to watch)."""
        self.cursor = len(self.lines)
        self.command({"start": {"cmd": [*prefix, *popsicle_cmd(), "station", *args, "--json"],
                                "env": env or {}}})
        note = self.wait(lambda e: e.get("event") == "note"
                         and e["text"].startswith("station "))
        self.url = re.search(r"http://\S+", note["text"]).group(0)  # type: ignore[union-attr]
        token = self.wait(lambda e: e.get("event") == "note"
                          and e["text"].startswith("token for POST"))
        self.token = token["text"].split(": ", 1)[1].split()[0]
        if watching:
            self.wait(lambda e: e.get("event") == "watching")

    def events(self) -> list[dict[str, Any]]:
        with self.cond:
            return [json.loads(line) for line in self.lines if line.startswith("{")]

    def wait(self, matches: Callable[[dict[str, Any]], bool] | None = None,
             timeout: float = 60, **fields: Any) -> dict[str, Any]:
        """The next event (after the last one waited for) that matches."""
        def ok(event: dict[str, Any]) -> bool:
            return (matches is None or matches(event)) and all(
                event.get(k) == v for k, v in fields.items())

        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                while self.cursor < len(self.lines):
                    line = self.lines[self.cursor]
                    self.cursor += 1
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(event, dict) and ok(event):
                        return event
                left = deadline - time.monotonic()
                assert left > 0, (f"never saw {fields or matches}; stderr: "
                                  f"{(self.work / 'stderr.txt').read_text()[-2000:]}")
                self.cond.wait(left)

    def add(self, description: str) -> None:
        self.command({"add": description})

    def remove(self, paths: list[str]) -> None:
        self.command({"remove": paths})

    def kill(self) -> int | None:
        self.command({"kill": True})
        return self.wait_exit()

    def signal(self, number: int) -> None:
        self.command({"signal": number})

    def wait_exit(self, timeout: float = 60) -> int | None:
        return self.reap(timeout)["exit"]  # type: ignore[no-any-return]

    def reap(self, timeout: float = 60) -> dict[str, Any]:
        """The command's exit status and CPU seconds, once it exited."""
        return self.command({"wait_exit": timeout}, timeout + 10)

    def read(self, path: str) -> bytes | None:
        reply = self.command({"read": [path], "dir": str(self.work)})
        name = reply["read"][path]
        return None if name is None else (self.work / name).read_bytes()

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    # ------------------------------------------------------------------------------------
    # HTTP

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=10) as response:
            body = response.read()
            if response.headers.get_content_type() == "application/json":
                return json.loads(body)
            return body.decode()

    def post(self, path: str, token: str | None = "") -> tuple[int, Any]:
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token or self.token}"
        request = urllib.request.Request(self.url + path.lstrip("/"), data=b"", method="POST",
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


def slot_map(path: Path, slots: dict[str, int]) -> Path:
    """A slot map file: label -> USB port number of the testbed's hub (port 1-N)."""
    text = "".join(f'[[slot]]\nlabel = "{label}"\nport = "1-{port}"\n\n'
                   for label, port in slots.items())
    path.write_text(text)
    return path
