"""An umockdev testbed driven line by line, for ``popsicle-py station`` tests.

Run as ``umockdev-wrapper /usr/bin/python3 tests/station_driver.py`` (the system Python has
``gi.repository.UMockdev``).  Unlike tests/watch_driver.py, which plays a fixed scenario,
this one takes commands on stdin, one JSON object a line, so that the test (in the venv,
with its HTTP client and Selenium) decides each step from what the station's page and API
show.  It answers on stdout, one JSON object a line:

    {"start": {"cmd": [...], "env": {...}}}   start the command (again, after a kill)
    {"add": description}                       plug a device in (a real "add" uevent)
    {"remove": [sysfs path, ...]}              unplug (deepest first)
    {"signal": 15} / {"kill": true}            signal the command / SIGKILL it
    {"wait_exit": seconds}                     -> {"exit": rc, "cpu": seconds, ...}
    {"read": ["/dev/sdb", ...], "dir": D}      copy testbed files to D -> {"read": {...}}

Every command is answered with {"ack": n} (n counts from 1) once done; the command's stdout
lines come as {"line": text}, its stderr goes to ``stderr.txt`` in the working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # noqa: E402

_out_lock = threading.Lock()


def send(obj: dict) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def drop_dangling_links(root: str) -> None:
    """As tests/watch_driver.py: remove_device() leaves links to what is gone."""
    for directory, dirs, files in os.walk(os.path.join(root, "sys")):
        for name in dirs + files:
            path = os.path.join(directory, name)
            if os.path.islink(path) and not os.path.exists(path):
                os.unlink(path)


def pump(stream) -> None:
    for line in stream:
        send({"line": line.rstrip("\n")})
    send({"eof": True})


def reap(proc: subprocess.Popen, timeout: float) -> dict:
    """Wait for the command's exit; its status, and its CPU seconds (from wait4)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return {"exit": proc.returncode, "cpu": usage.ru_utime + usage.ru_stime,
                    "maxrss_kib": usage.ru_maxrss}
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            return {"exit": None}
        time.sleep(0.02)


def main() -> int:
    tb = UMockdev.Testbed.new()
    root = tb.get_root_dir()
    proc: subprocess.Popen | None = None
    stderr = open("stderr.txt", "a")  # noqa: SIM115 - open for the driver's life
    for number, text in enumerate(sys.stdin, 1):
        step = json.loads(text)
        reply: dict = {"ack": number}
        if "start" in step:
            env = {**os.environ, **step["start"].get("env", {}), "UMOCKDEV_DIR": root}
            proc = subprocess.Popen(step["start"]["cmd"], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
            threading.Thread(target=pump, args=(proc.stdout,), daemon=True).start()
        elif "add" in step:
            tb.add_from_string(step["add"])
        elif "remove" in step:
            for path in step["remove"]:
                tb.uevent(path, "remove")
                tb.remove_device(path)
            drop_dangling_links(root)
        elif "signal" in step and proc is not None:
            proc.send_signal(step["signal"])
        elif "kill" in step and proc is not None:
            proc.send_signal(signal.SIGKILL)
        elif "wait_exit" in step and proc is not None:
            reply.update(reap(proc, step["wait_exit"]))
        elif "read" in step:
            copied = {}
            for path in step["read"]:
                source = root + path
                name = path.strip("/").replace("/", "_")
                if os.path.exists(source):
                    shutil.copyfile(source, os.path.join(step["dir"], name))
                    copied[path] = name
                else:
                    copied[path] = None
            reply["read"] = copied
        else:
            reply["error"] = f"unknown step {step!r}"
        send(reply)
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
