"""--min-write-speed judges the drive, not the image: a fast stick fed by a slow source (a
download, a decompression, a pipe) waits for data, and that wait is not its speed."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from tests.conftest import popsicle_cmd
from tests.loopdev import Loop

pytestmark = pytest.mark.root
MiB = 1 << 20



def _paced(pipe: IO[bytes], data: bytes, rate: int) -> None:
    """``data`` into ``pipe`` at about ``rate`` bytes per second, then closed."""
    step = rate // 20
    began = time.monotonic()
    try:
        for at in range(0, len(data), step):
            pipe.write(data[at:at + step])
            pipe.flush()
            ahead = began + (at + step) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)  # the source's pace, not a wait for the program
    except BrokenPipeError:
        pass
    finally:
        pipe.close()


def test_a_fast_drive_fed_by_a_slow_source_is_not_too_slow(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    """It was rejected, "too slow: writes at 1.2 MiB/s", unthrottled on tmpfs."""
    data = os.urandom(40 * MiB)
    loop = loop_factory(48 * MiB, fill=0x5A)
    proc = subprocess.Popen([*popsicle_cmd(), "flash", "-", loop.path, "--yes", "--json",
                             "--no-probe", "--bucket-size", "1M", "--min-write-speed", "15MB/s"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    feeder = threading.Thread(target=_paced, args=(proc.stdin, data, 6_000_000))
    feeder.start()
    try:
        assert proc.stdout is not None
        out = proc.stdout.read()  # the feeder closes stdin (communicate would at once)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        feeder.join()
    found = [json.loads(line) for line in out.splitlines() if line.startswith(b"{")]
    results = [e for e in found if e["event"] == "result"]
    assert [(r["status"], r["error"]) for r in results] == [("ok", None)], out
    assert proc.returncode == 0
    assert loop.read(len(data)) == data

