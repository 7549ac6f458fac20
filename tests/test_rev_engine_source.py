"""A read of the image made for one drive alone (a laggard's) that fails is the image's fault:
the drive's result must not call it the drive's I/O error ("the drive may be failing")."""

from __future__ import annotations

import json
import os
import subprocess
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
