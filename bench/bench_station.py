"""The station's cost: event-to-page latency with N drives at once, and CPU beside ``watch``.

Not a test.  Runs under umockdev (tests/station_driver.py, as the station's tests do): N
sticks plugged in at once, written from the same image, first by ``watch --count N`` then by
``station --count N`` (taking turns for ``--rounds``), each a whole process whose CPU time
(user + system, from wait4) is measured.

Latency: a reader of ``/api/stream`` (the page's own Server-Sent Events, read here in Python
rather than a browser: the same bytes on the same socket) stamps each state as it arrives;
each state change of a slot that the station's stdout announces (a drive added, a phase, a
result) is stamped as its line arrives, and the latency is the time from that line to the
first page state showing it (negative when the page was quicker than the stdout relay).  The
station's session thread hands the drives' events on every 0.1 s (watch's loop) and the page
gets at most ten states a second: both bound what is measured here.

    umockdev-wrapper is needed (apt: umockdev gir1.2-umockdev-1.0 python3-gi), as root.
    /work/venv/bin/python bench/bench_station.py [--drives 16] [--image-mib 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]
# The children (the driver, the command) run this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                        os.environ.get("PYTHONPATH")]))

from conftest import popsicle_cmd  # noqa: E402
from station_rig import Rig, slot_map  # noqa: E402
from test_watch import Stick  # noqa: E402

MiB = 1 << 20
STATE_OF = {"probing": "probing", "writing": "writing", "syncing": "writing",
            "verifying": "verifying"}


def sticks(n: int, size: int) -> list[Stick]:
    return [Stick(chr(ord("b") + i), i + 1, size) for i in range(n)]


def run_watch(work: Path, image: Path, drives: list[Stick]) -> dict[str, Any]:
    rig = Rig(work)
    try:
        rig.command({"start": {"cmd": [*popsicle_cmd(), "watch", str(image), "--yes", "--json",
                                       "--count", str(len(drives)), "--no-power-off"]}})
        rig.wait(event="watching")
        start = time.monotonic()
        plug(rig, drives)
        reaped = rig.reap(300)
        reaped["wall"] = time.monotonic() - start
        return reaped
    finally:
        rig.close()


def plug(rig: Rig, drives: list[Stick]) -> None:
    """Plug the sticks in as fast as the command takes them: each one's ``drive_added``
    before the next (umockdev's uevent socket is small: a burst of 64 uevents overflows it,
    where the kernel's netlink socket would only drop some)."""
    for stick in drives:
        rig.add(stick.description)
        rig.wait(event="drive_added", device=stick.dev)


class PageReader:
    """Reads /api/stream; keeps (arrival time, state) of every message."""

    def __init__(self, url: str) -> None:
        self.states: list[tuple[float, dict[str, Any]]] = []
        self.thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self.thread.start()

    def _read(self, url: str) -> None:
        try:
            with urllib.request.urlopen(url + "api/stream", timeout=600) as stream:
                for raw in stream:
                    line = raw.decode()
                    if line.startswith("data: "):
                        self.states.append((time.monotonic(), json.loads(line[6:])))
        except OSError:
            return  # the station ended


def run_station(work: Path, image: Path, drives: list[Stick]) -> dict[str, Any]:
    rig = Rig(work)
    slots = slot_map(work / "slots.toml", {str(i + 1): i + 1 for i in range(len(drives))})
    try:
        rig.start([str(image), "--yes", "--slots", str(slots), "--journal",
                   str(work / "j.sqlite"), "--listen", "127.0.0.1:0", "--count",
                   str(len(drives)), "--no-power-off"])
        page = PageReader(rig.url)
        while not page.states:
            time.sleep(0.01)
        first_line = len(rig.lines)
        start = time.monotonic()
        plug(rig, drives)
        reaped = rig.reap(300)
        reaped["wall"] = time.monotonic() - start
        page.thread.join(10)
        reaped["latencies"] = latencies(rig.lines[first_line:], rig.times[first_line:],
                                        page.states)
        return reaped
    finally:
        rig.close()


def latencies(lines: list[str], times: list[float],
              states: list[tuple[float, dict[str, Any]]]) -> list[float]:
    """From each announced state change to the first page state that shows it."""
    found: list[float] = []
    for line, at in zip(lines, times, strict=True):
        event = json.loads(line)
        slot = event.get("slot")
        want = None
        if event["event"] == "drive_added" and event.get("eligible"):
            want = "probing"
        elif event["event"] == "phase" and event.get("phase") in STATE_OF:
            want = STATE_OF[event["phase"]]
        elif event["event"] == "result":
            want = "done" if event["status"] == "ok" else "failed"
        if slot is None or want is None:
            continue
        for seen, state in states:
            tile = next((s for s in state["slots"] if s["label"] == slot), None)
            if tile is not None and tile["state"] == want and seen >= at - 1.0:
                found.append(seen - at)
                break
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--drives", type=int, default=16)
    parser.add_argument("--image-mib", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-station-") as tmp:
        root = Path(tmp)
        image = root / "image.img"
        image.write_bytes(os.urandom(args.image_mib * MiB))
        drives = sticks(args.drives, 2 * args.image_mib * MiB)
        cpu: dict[str, list[float]] = {"watch": [], "station": []}
        wall: dict[str, list[float]] = {"watch": [], "station": []}
        lat: list[float] = []
        for n in range(args.rounds):
            for name, run in (("watch", run_watch), ("station", run_station)):
                got = run(root / f"{name}-{n}", image, drives)
                assert got["exit"] == 0, got
                cpu[name].append(got["cpu"])
                wall[name].append(got["wall"])
                lat.extend(got.get("latencies", []))
                print(f"round {n + 1} {name}: cpu {got['cpu']:.2f} s, wall {got['wall']:.2f} s,"
                      f" peak RSS {got['maxrss_kib'] // 1024} MiB", file=sys.stderr)
        lat.sort()
        p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
        print(f"{args.drives} drives, {args.image_mib} MiB image, {args.rounds} round(s)")
        for name in ("watch", "station"):
            print(f"  {name:8} CPU median {statistics.median(cpu[name]):.2f} s, wall median "
                  f"{statistics.median(wall[name]):.2f} s")
        ratio = statistics.median(cpu["station"]) / statistics.median(cpu["watch"])
        print(f"  station/watch CPU: {ratio:.2f}")
        print(f"  event-to-page latency ({len(lat)} state changes): median "
              f"{1000 * statistics.median(lat):.0f} ms, p99 {1000 * p99:.0f} ms, "
              f"max {1000 * lat[-1]:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
