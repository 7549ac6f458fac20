"""A read of the image made for one drive alone (a laggard's) that fails is the image's fault:
the drive's result must not call it the drive's I/O error ("the drive may be failing")."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from conftest import Loop, needs_root, popsicle_cmd
from faulty import FaultyDrive, FaultyFile, MiB

pytestmark = needs_root

IMAGE = 24 * MiB
BAD = 16 * MiB  # read right by the reader, then failing: a flaky disk under the image


def test_a_laggards_failed_read_of_the_image_is_the_images_fault(
        faulty_file: Callable[..., FaultyFile], faulty_drive: Callable[..., FaultyDrive],
        loop_factory: Callable[..., Loop]) -> None:
    content = os.urandom(IMAGE)
    source = faulty_file(content, bad_read_from=(BAD, BAD + 4096, 2))
    fast = loop_factory(64 * MiB)
    slow = faulty_drive(64 * MiB, crawl=(0, 8_000_000))  # a full ring behind: goes on alone
    proc = subprocess.run(
        [*popsicle_cmd(), "flash", source.file, fast.path, slow.path, "--yes", "--json",
         "--no-probe", "--no-checksum", "--bucket-size", "1M", "--buckets", "2"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    events: list[dict[str, Any]] = [json.loads(line) for line in proc.stdout.splitlines()]
    results = {r["device"]: r for r in events[-1]["results"]}
    assert proc.returncode == 1, proc.stderr
    assert results[fast.path]["status"] == "ok"
    assert fast.read(IMAGE) == content
    bad = results[slow.path]
    assert bad["status"] == "failed"
    assert bad["cause"] == "source", bad
    assert "reading the image again for this drive failed" in bad["error"]
    assert "drive may be failing" not in bad["error"]
    assert slow.read(0, 64 << 10) != content[: 64 << 10]  # never the image's head


def test_a_bad_block_of_the_image_is_said_as_the_images_with_where(
        faulty_file: Callable[..., FaultyFile], loop_factory: Callable[..., Loop]) -> None:
    """A bad block under the image (or a master drive's): each drive failed with a bare
    "Input/output error", which reads as the drive's own, and nothing said where."""
    content = os.urandom(IMAGE)
    source = faulty_file(content, bad_read=(BAD + 4096, BAD + 8192))
    drives = [loop_factory(64 * MiB) for _ in range(2)]
    proc = subprocess.run(
        [*popsicle_cmd(), "flash", source.file, *(d.path for d in drives), "--yes", "--json",
         "--no-probe", "--no-checksum", "--bucket-size", "1M"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    events: list[dict[str, Any]] = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 1, proc.stderr
    for result in events[-1]["results"]:
        assert (result["status"], result["cause"]) == ("failed", "source"), result
        assert result["error"] == (f"{result['device']}: reading the image failed in its "
                                   f"bytes {BAD}-{BAD + MiB - 1}: Input/output error"), result
    for drive in drives:
        assert drive.read(0, 64 << 10) != content[: 64 << 10]  # never the image's head


def _events_of(proc: subprocess.Popen[str], into: queue.Queue[dict[str, Any]]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        into.put(json.loads(line))


def test_ctrl_c_while_the_images_read_hangs_says_why_the_shell_waits(
        faulty_file: Callable[..., FaultyFile], loop_factory: Callable[..., Loop]) -> None:
    """The image's read stuck in its FUSE daemon (a hung share, a dead master drive): after a
    Ctrl-C the summary came, and then the shell did not, with nothing saying why (the kernel
    ends the process only once that read returns)."""
    content = os.urandom(IMAGE)
    # The first read of byte 8 MiB answers in 10 minutes, or once the fault is lifted.
    source = faulty_file(content, read_hang_after=(8 * MiB, 8 * MiB + 4096, 0, 600))
    drive = loop_factory(64 * MiB)
    proc = subprocess.Popen(
        [*popsicle_cmd(), "flash", source.file, drive.path, "--yes", "--json", "--no-probe",
         "--no-checksum", "--bucket-size", "1M"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    lines: queue.Queue[dict[str, Any]] = queue.Queue()
    threading.Thread(target=_events_of, args=(proc, lines), daemon=True).start()
    try:
        seen: list[dict[str, Any]] = []
        while not any(e["event"] == "progress" for e in seen):  # the image checked, written
            seen.append(lines.get(timeout=60))
        deadline = time.monotonic() + 30
        while not source.read_hangs():  # the reader inside that read (logged as it begins)
            assert time.monotonic() < deadline, "the read of byte 8 MiB never came"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        while seen[-1]["event"] != "summary":
            seen.append(lines.get(timeout=15))
        notes = [e["text"] for e in seen if e["event"] == "note"]
        assert (f"{source.file}: a read of the image has not returned; popsicle-py exits once "
                "it does (when the disk or share it is on answers again)") in notes, notes
        assert proc.poll() is None  # still held by the kernel, as the note says
    finally:
        source.set(read_hang_after=None)
    assert proc.wait(timeout=30) == 130, proc.stderr.read()  # type: ignore[union-attr]
