"""A master (or a drive being read) written through one of its PARTITIONS while it is read.

Each partition node has a page cache of its own: a buffered write through /dev/sdb1 by a
program that still holds it open is written back by neither a sync of /dev/sdb nor a close,
so the kernel's write counters did not move when the read ended, and ``flash`` said ok with
copies that are not the master, ``read`` an image that is not the drive.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Loop, needs_root, popsicle_cmd
from loopdev import loop_device

MiB = 1 << 20
PATTERN = 0x5A
SIZE = 24 * MiB

pytestmark = needs_root


@pytest.fixture
def partitioned_master() -> Iterator[Loop]:
    """A drive with one partition from 1 MiB to its end, random bytes in it."""
    with loop_device(SIZE, partitions=[(2048, SIZE // 512 - 2048)]) as m:
        with open(m.backing, "r+b") as f:
            f.seek(MiB)
            f.write(os.urandom(SIZE - MiB))
        subprocess.run(["blockdev", "--flushbufs", m.path], check=True)
        yield m


def run_written_meanwhile(args: list[str], partition: str, add: Callable[[int], None]
                          ) -> tuple[int, dict[str, Any]]:
    """Run ``args`` (--json) and, at the first progress, write 4 KiB at the partition's
    start through its node, buffered, holding it open until the run has ended."""
    proc = subprocess.Popen([*popsicle_cmd(), *args, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: add(os.getpid()))
    assert proc.stdout is not None
    fd = -1
    try:
        for line in proc.stdout:
            if json.loads(line)["event"] == "progress":  # the first MiB is read by now
                fd = os.open(partition, os.O_WRONLY)
                os.pwrite(fd, b"changed!" * 512, 0)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if fd >= 0:
            os.close(fd)
    return proc.returncode, json.loads(out.splitlines()[-1] if out else err)


def test_a_master_written_through_its_partition_fails_every_drive(
        partitioned_master: Loop, loop_factory: Callable[..., Loop],
        throttle: Callable[..., Any]) -> None:
    m = partitioned_master
    targets = [loop_factory(SIZE, fill=PATTERN) for _ in range(2)]
    status, summary = run_written_meanwhile(
        ["flash", m.path, *(t.path for t in targets), "--yes", "--no-probe",
         "--bucket-size", "1M", "--buckets", "2"],
        f"{m.path}p1", throttle(*((t, 16 * MiB) for t in targets)))
    assert status == 1, summary
    for r in summary["results"]:
        assert r["status"] == "failed" and r["cause"] == "source", r
        assert f"the master drive {m.path} changed while it was read" in r["error"], r


def test_a_drive_written_through_its_partition_while_read_is_not_imaged(
        partitioned_master: Loop, throttle: Callable[..., Any], tmp_path: Path) -> None:
    m = partitioned_master
    out = tmp_path / "m.img"
    status, summary = run_written_meanwhile(["read", m.path, str(out)], f"{m.path}p1",
                                            throttle((m, 16 * MiB)))
    assert status == 1, summary
    (r,) = summary["results"]
    assert r["status"] == "failed" and r["cause"] == "source", r
    assert f"{m.path} changed while it was read" in r["error"], r
    assert list(tmp_path.iterdir()) == []
