"""Grading: drives rejected for speed (blkio-throttled loop devices) or capacity, the others
written as usual; a rejected drive is not written further and never holds the image's head."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from popsicle_py.engine import HEAD  # the image's head (its first MiB: random images)
from popsicle_py.grading import SpeedJudge, SpeedRule, capacity_verdict, chain
from tests.conftest import popsicle_cmd
from tests.loopdev import Loop

MiB = 1 << 20


def test_speed_is_judged_at_steady_state_only() -> None:
    judge = SpeedJudge(SpeedRule(min_write=10 * MiB, warmup=2.0, window=3.0))
    # A burst at 100 MiB/s in the first 2 s, then 2 MiB/s: judged once 3 s of the slow part
    # are seen, not before, and never on the burst.
    done, verdicts = 0, []
    for tenth in range(0, 80):
        t = tenth / 10
        done += (10 * MiB if t < 2 else MiB // 5)
        verdicts.append((t, judge.feed("write", done, t)))
    first = next(t for t, v in verdicts if v is not None)
    assert 5.0 <= first <= 5.2
    assert "writes at" in str(dict(verdicts)[first]) and "below the minimum of 10 MiB/s" in \
        str(dict(verdicts)[first])


def test_a_fast_drive_and_a_short_phase_are_never_rejected() -> None:
    fast = SpeedJudge(SpeedRule(min_write=10 * MiB, min_read=10 * MiB))
    assert all(fast.feed("write", i * 2 * MiB, i / 10) is None for i in range(200))
    short = SpeedJudge(SpeedRule(min_read=10 * MiB))
    assert all(short.feed("read", i, i / 10) is None for i in range(40))  # 4 s: not judged
    writes_only = SpeedJudge(SpeedRule(min_read=10 * MiB))
    assert all(writes_only.feed("write", i, i / 10) is None for i in range(200))
    # A new phase starts its own warm-up.
    judge = SpeedJudge(SpeedRule(min_write=10 * MiB, min_read=10 * MiB))
    assert all(judge.feed("write", i * 2 * MiB, i / 10) is None for i in range(100))
    assert judge.feed("read", 1, 10.0) is None and judge.feed("read", 2, 11.9) is None


def test_a_new_pass_starts_its_own_warm_up() -> None:
    """The head, read back alone after a long verification, counts from 0 again: not a drive
    that went backwards (a negative speed would reject every drive whose check took > 5 s)."""
    judge = SpeedJudge(SpeedRule(min_read=10 * MiB))
    assert all(judge.feed("read", i * 5 * MiB, i / 10) is None for i in range(100))
    assert judge.feed("read", 64 << 10, 10.0) is None
    assert judge.feed("read", 64 << 10, 16.0) is None  # warm-up again: never judged


def test_a_chains_error_is_the_steps_and_every_put_back_is_called() -> None:
    """A pulled drive fails the step and the put-backs after it: the step's error is the one a
    user sees, and no put-back is skipped because another one raised."""
    calls: list[tuple[str, int]] = []

    def step(name: str, fails: bool = False, back_fails: bool = False
             ) -> Callable[[object], Callable[[int], None]]:
        def run(_: object) -> Callable[[int], None]:
            if fails:
                raise OSError(f"{name} failed")

            def put_back(stamped: int) -> None:
                calls.append((name, stamped))
                if back_fails:
                    raise OSError(f"{name}'s put-back failed")
            return put_back
        return run

    failing = chain(step("a", back_fails=True), step("b"), step("c", fails=True))
    assert failing is not None
    with pytest.raises(OSError, match=r"^c failed$"):
        failing(None)
    assert calls == [("b", 0), ("a", 0)]

    calls.clear()
    passing = chain(step("a"), step("b", back_fails=True), step("c"))
    assert passing is not None
    back = passing(None)
    assert back is not None
    with pytest.raises(OSError, match=r"^b's put-back failed$"):
        back(4096)
    assert calls == [("c", 4096), ("b", 4096), ("a", 4096)]


def test_capacity_rule() -> None:
    gb = 1000**3
    assert capacity_verdict(31 * gb, 32 * gb, 5) is None
    assert capacity_verdict(31 * gb, None, 0) is None
    assert "outside the 29.8 GiB (+-2%)" in str(capacity_verdict(8 * gb, 32 * gb, 2))
    assert capacity_verdict(32 * gb, 32 * gb, 0) is None
    assert capacity_verdict(32 * gb + 1, 32 * gb, 0) is not None


def flash(image: Path, *devices: str, extra: tuple[str, ...] = (),
          preexec: Callable[[], None] | None = None) -> tuple[int, list[dict[str, Any]], str]:
    proc = subprocess.run([*popsicle_cmd(), "flash", str(image), *devices, "--yes", "--json",
                           "--no-probe", "--bucket-size", "1M", *extra],
                          capture_output=True, text=True, timeout=120, preexec_fn=preexec,
                          stdin=subprocess.DEVNULL)
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


def results(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["device"]: r for r in events[-1]["results"]}


def test_a_slow_drive_beside_fast_ones_is_rejected(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Callable[[int], None]],
        tmp_path: Path) -> None:
    data = os.urandom(48 * MiB)
    image = tmp_path / "disk.img"
    image.write_bytes(data)
    fast = [loop_factory(64 * MiB, fill=0x5A) for _ in range(2)]
    slow = loop_factory(64 * MiB, fill=0x5A)
    add = throttle((fast[0], 40_000_000), (fast[1], 40_000_000), (slow, 4_000_000))
    started = time.monotonic()
    rc, events, stderr = flash(image, fast[0].path, slow.path, fast[1].path,
                               extra=("--min-write-speed", "15MB/s"),
                               preexec=lambda: add(os.getpid()))
    took = time.monotonic() - started
    assert rc == 1, stderr
    found = results(events)
    assert {d: r["status"] for d, r in found.items()} == {
        fast[0].path: "ok", slow.path: "rejected", fast[1].path: "ok"}
    bad = found[slow.path]
    assert bad["cause"] == "slow" and "too slow: writes at" in bad["error"], bad
    assert "below the minimum of 14.3 MiB/s" in bad["error"]
    # Rejected once 2 s of warm-up and 3 s of steady state were seen (plus a loaded
    # machine's margin), long before the 12 s the image would take it.
    assert bad["elapsed"] < 9, bad
    assert bad["bytes_written"] < len(data) // 2
    assert slow.read(HEAD) != data[:HEAD]  # never the image's head
    for loop in fast:
        assert loop.read(len(data)) == data
    assert took < 30


def test_capacity_rejects_before_writing(loop_factory: Callable[..., Loop],
                                         tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    image = tmp_path / "disk.img"
    image.write_bytes(data)
    right = loop_factory(8 * MiB, fill=0x5A)
    wrong = loop_factory(16 * MiB, fill=0x5A)
    before = wrong.read()
    rc, events, stderr = flash(image, right.path, wrong.path,
                               extra=("--capacity", "8MiB", "--tolerance", "5"))
    assert rc == 1, stderr
    found = results(events)
    assert found[right.path]["status"] == "ok"
    assert found[wrong.path]["status"] == "rejected"
    assert found[wrong.path]["cause"] == "capacity"
    assert found[wrong.path]["bytes_written"] == 0
    # The cause is said once, by the status: the error is what README quotes.
    assert found[wrong.path]["error"] == (
        f"{wrong.path}: holds 16 MiB, outside the 8 MiB (+-5%) asked for")
    assert wrong.read() == before  # nothing written, not even the stamp
    assert right.read(len(data)) == data


def test_grading_refusals(loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))
    loop = loop_factory(4 * MiB, fill=0x5A)
    for extra, words in ((("--tolerance", "5"), "--capacity"),
                         (("--min-read-speed", "1MB/s", "--no-verify"), "contradict"),
                         (("--min-write-speed", "fast"), "not a speed: 'fast'"),
                         (("--min-write-speed", "/s"), "not a speed: '/s'"),
                         (("--min-read-speed", "0MB/s"), "at least 1 byte per second")):
        rc, _, stderr = flash(image, loop.path, extra=extra)
        assert rc == 2 and words in stderr, (extra, stderr)
    assert loop.read(MiB) == bytes([0x5A]) * MiB


def test_surface_test_passes_a_good_drive_and_clears_it(loop_factory: Callable[..., Loop],
                                                        tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 5)
    image = tmp_path / "disk.img"
    image.write_bytes(data)
    loop = loop_factory(24 * MiB, fill=0x5A)
    rc, events, stderr = flash(image, loop.path, extra=("--surface-test",))
    assert rc == 0, stderr
    assert results(events)[loop.path]["status"] == "ok"
    notes = [e["text"] for e in events if e["event"] == "note"]
    assert f"{loop.path}: surface test of bytes {4 * MiB}-{24 * MiB - 1}" in notes
    assert loop.read(len(data)) == data
    assert loop.read(20 * MiB, 4 * MiB) == bytes(20 * MiB)  # tested, then cleared


def test_surface_test_rejects_a_bad_region_past_the_image(
        faulty_drive: Callable[..., Any], tmp_path: Path) -> None:
    data = os.urandom(4 * MiB)
    image = tmp_path / "disk.img"
    image.write_bytes(data)
    bad = 21 * MiB + 4096
    drive = faulty_drive(32 * MiB, fill=0x5A, flip_bit=(bad, 1))
    rc, events, stderr = flash(image, drive.path, extra=("--surface-test",))
    assert rc == 1, stderr
    result = results(events)[drive.path]
    assert (result["status"], result["cause"]) == ("rejected", "surface"), result
    assert result["error"].startswith(f"{drive.path}: surface test: bad region at byte {bad}: ")
    assert drive.read(0, HEAD) != data[:HEAD]  # rejected: never the image's head
    assert drive.read(HEAD, len(data) - HEAD) == data[HEAD:]  # the image was verified first


def test_a_drive_slow_to_read_back_is_rejected_without_the_head(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Callable[[int], None]],
        tmp_path: Path) -> None:
    data = os.urandom(24 * MiB)
    image = tmp_path / "disk.img"
    image.write_bytes(data)
    fast = loop_factory(32 * MiB, fill=0x5A)
    slow = loop_factory(32 * MiB, fill=0x5A)
    add = throttle((fast, 40_000_000), (slow, 4_000_000))
    rc, events, stderr = flash(image, fast.path, slow.path,
                               extra=("--min-read-speed", "15MB/s"),
                               preexec=lambda: add(os.getpid()))
    assert rc == 1, stderr
    found = results(events)
    assert found[fast.path]["status"] == "ok"
    bad = found[slow.path]
    assert (bad["status"], bad["cause"]) == ("rejected", "slow"), bad
    assert "too slow: reads back at" in bad["error"]
    assert bad["bytes_written"] == len(data) - HEAD  # written whole, but for the head
    assert slow.read(HEAD) != data[:HEAD] and slow.read(len(data) - HEAD, HEAD) == data[HEAD:]
    assert fast.read(len(data)) == data


def test_a_drive_above_the_minimums_is_never_rejected_however_long_its_passes(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Callable[[int], None]],
        tmp_path: Path) -> None:
    """Writing and verifying both last long enough to be judged (> 5 s), and the head is read
    back alone at the end: a steady 4 MB/s drive passes minimums of 2 MB/s."""
    data = os.urandom(24 * MiB)
    image = tmp_path / "disk.img"
    image.write_bytes(data)
    loop = loop_factory(32 * MiB, fill=0x5A)
    add = throttle((loop, 4_000_000))
    rc, events, stderr = flash(image, loop.path,
                               extra=("--min-write-speed", "2MB/s", "--min-read-speed", "2MB/s"),
                               preexec=lambda: add(os.getpid()))
    assert rc == 0, (stderr, results(events))
    assert loop.read(len(data)) == data
