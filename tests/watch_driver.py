"""Drive ``popsicle-py watch`` through a umockdev testbed with real udev events.

Run as ``umockdev-wrapper /usr/bin/python3 tests/watch_driver.py SCENARIO.json`` (the system
Python: it has ``gi.repository.UMockdev``; without the wrapper, uevents fail with "No such
device").  The scenario is JSON written by tests/test_watch.py:

    {"cmd": [...], "env": {...}, "present": [description, ...], "timeout": 40,
     "steps": [{"wait": {"event": "watching"}}, {"add": description},
               {"remove": ["/sys/devices/.../block/sdc", ...]}, {"signal": 2},
               {"change": "/sys/devices/.../block/sdf", "attributes": {"size": "131072"}},
               {"wait_line": "text"}, {"flip": "/tmp/.../image.img", "offset": 100},
               {"fifo": "/sys/devices/.../remove"}, {"kill": PID, "with": 19},
               {"uevent": "/sys/devices/.../block/sdc", "action": "add"},
               {"unlink": "/tmp/.../image.img"}],
     "read": ["/dev/sdb", "/sys/devices/.../remove"], "out": "report.json", "dir": "DIR"}

``present`` devices are in the testbed before the command starts.  Steps run in order; a
``wait`` blocks until a JSON line on the command's stdout (after the one the previous wait
matched) has every key/value given; ``remove`` sends a "remove" uevent for each sysfs path
(deepest first), then removes it from the testbed; ``fifo`` makes a testbed file a named
pipe nobody reads (opening it to write hangs, as a dead stick's flush or sysfs can; never
``read`` it).  No sleeps: the command's own events are the clock.  After the command exits,
every ``read`` path of the testbed is copied to DIR (``/`` -> ``_``), and the report (exit
status, stdout lines, stderr, problems) is written to ``out``.
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


class Output:
    """The command's stdout lines, collected on a thread; waits scan from a cursor."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.closed = False
        self.cond = threading.Condition()
        self.cursor = 0
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait(self, matches, deadline: float) -> bool:
        with self.cond:
            while True:
                while self.cursor < len(self.lines):
                    line = self.lines[self.cursor]
                    self.cursor += 1
                    if matches(line):
                        return True
                if self.closed:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)


def drop_dangling_links(root: str) -> None:
    """remove_device() leaves /sys/block/sdc and friends behind, and then the same stick
    cannot be added again ("assertion failed: symlink"): drop the links to what is gone."""
    for directory, dirs, files in os.walk(os.path.join(root, "sys")):
        for name in dirs + files:
            path = os.path.join(directory, name)
            if os.path.islink(path) and not os.path.exists(path):
                os.unlink(path)


def json_match(want: dict):
    def matches(line: str) -> bool:
        try:
            got = json.loads(line)
        except ValueError:
            return False
        return isinstance(got, dict) and all(got.get(k) == v for k, v in want.items())
    return matches


def main() -> int:
    with open(sys.argv[1]) as f:
        scenario = json.load(f)
    os.makedirs(scenario["dir"], exist_ok=True)
    with open(os.path.join(scenario["dir"], "stderr.txt"), "w+") as stderr:
        report = run(scenario, stderr)
    with open(scenario["out"], "w") as f:
        json.dump(report, f)
    return 0


def run(scenario: dict, stderr) -> dict:
    timeout = scenario.get("timeout", 40)
    deadline = time.monotonic() + timeout
    problems: list[str] = []
    tb = UMockdev.Testbed.new()
    root = tb.get_root_dir()
    for description in scenario.get("present", []):
        tb.add_from_string(description)
    env = {**os.environ, **scenario.get("env", {}), "UMOCKDEV_DIR": root}
    proc = subprocess.Popen(scenario["cmd"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env=env)
    out = Output(proc.stdout)
    for step in scenario["steps"]:
        if "wait" in step or "wait_line" in step:
            want = step.get("wait")
            matcher = json_match(want) if want is not None else \
                (lambda line, text=step["wait_line"]: text in line)
            if not out.wait(matcher, deadline):
                problems.append(f"never saw {want or step['wait_line']!r}")
                break
        elif "add" in step:
            tb.add_from_string(step["add"])
        elif "remove" in step:
            paths = step["remove"] if isinstance(step["remove"], list) else [step["remove"]]
            for path in paths:
                tb.uevent(path, "remove")
                tb.remove_device(path)
            drop_dangling_links(root)
        elif "change" in step:
            for name, value in step.get("attributes", {}).items():
                tb.set_attribute(step["change"], name, value)
            tb.uevent(step["change"], "change")
        elif "uevent" in step:  # an event alone, the device unchanged (``udevadm trigger``)
            tb.uevent(step["uevent"], step.get("action", "change"))
        elif "unlink" in step:  # a file (the image) deleted
            os.unlink(step["unlink"])
        elif "fifo" in step:
            os.unlink(root + step["fifo"])
            os.mkfifo(root + step["fifo"])
        elif "signal" in step:
            proc.send_signal(step["signal"])
        elif "kill" in step:  # another process: a FUSE daemon stopped (its share hangs)
            os.kill(step["kill"], step["with"])
        elif "flip" in step:  # a byte of a file (the image) changed in place
            with open(step["flip"], "r+b") as f:
                f.seek(step["offset"])
                byte = f.read(1)
                f.seek(step["offset"])
                f.write(bytes([byte[0] ^ 0xFF]))
        else:
            problems.append(f"unknown step {step!r}")
            break
    if problems:
        proc.kill()
    try:
        rc = proc.wait(max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        problems.append("the command did not exit in time")
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait()
    with out.cond:
        out.cond.wait_for(lambda: out.closed, 5)
    copied = {}
    for path in scenario.get("read", []):
        name = path.strip("/").replace("/", "_")
        source = root + path
        if os.path.exists(source):
            shutil.copyfile(source, os.path.join(scenario["dir"], name))
            copied[path] = name
        else:
            copied[path] = None
    stderr.seek(0)
    return {"rc": rc, "stdout": out.lines, "stderr": stderr.read(), "problems": problems,
            "read": copied}


if __name__ == "__main__":
    sys.exit(main())
