"""The fault matrix: dying, read-only, busy, crawling drives, signals, a shrinking image.

Each case runs the real command on loop devices and checks what a user would see: the exit
status, every drive's status in the JSON summary, and the bytes on every drive.  Interrupted
or failed drives must not hold the image's first bucket (it is written last).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, needs_root, popsicle_cmd

pytestmark = needs_root

BUCKET = 1 << 20
PATTERN = 0x5A


def make_image(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def flash_args(image: Path | str, *devices: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [*popsicle_cmd(), "flash", str(image), *devices, "--yes", "--json",
            "--bucket-size", str(BUCKET), *extra]


def run(args: list[str], preexec: Callable[[], None] | None = None,
        timeout: float = 120) -> tuple[int, list[dict], str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec, stdin=subprocess.DEVNULL)
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


def statuses(events: list[dict]) -> dict[str, str]:
    summary = events[-1]
    assert summary["event"] == "summary"
    return {r["device"]: r["status"] for r in summary["results"]}


def result_of(events: list[dict], device: str) -> dict:
    return next(r for r in events[-1]["results"] if r["device"] == device)


def first_bucket_is_not_image(loop: Loop, image: bytes) -> bool:
    return loop.read(BUCKET) != image[:BUCKET]


def test_enospc_on_one_of_three(loop_factory: Callable[..., Loop],
                                dying_loop: Callable[..., Loop], tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", 12 << 20)
    good = [loop_factory(16 << 20, fill=PATTERN) for _ in range(2)]
    dying = dying_loop(16 << 20, good=4 << 20)
    rc, events, stderr = run(flash_args(tmp_path / "img", good[0].path, dying.path,
                                        good[1].path))
    assert rc == 1, stderr
    assert statuses(events) == {good[0].path: "ok", dying.path: "failed", good[1].path: "ok"}
    assert "no space" in result_of(events, dying.path)["error"]
    for loop in good:
        assert loop.read(len(image)) == image
    assert first_bucket_is_not_image(dying, image)
    assert "Traceback" not in stderr


def test_read_only_drive_is_refused_and_nothing_written(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    make_image(tmp_path / "img", 2 << 20)
    healthy = loop_factory(4 << 20, fill=PATTERN)
    locked = loop_factory(4 << 20, fill=PATTERN, read_only=True)
    rc, events, stderr = run(flash_args(tmp_path / "img", healthy.path, locked.path))
    assert rc == 2
    assert "read-only" in stderr or "write-protected" in stderr
    assert events[-1] == {"event": "summary", "ok": False, "results": []}
    assert healthy.read() == bytes([PATTERN]) * healthy.size


def test_mounted_drive_is_refused(loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    make_image(tmp_path / "img", 2 << 20)
    healthy = loop_factory(4 << 20, fill=PATTERN)
    busy = loop_factory(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", busy.path], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", busy.path, str(mnt)], check=True)
    try:
        before = busy.read(1 << 20)
        rc, _, stderr = run(flash_args(tmp_path / "img", healthy.path, busy.path))
        assert rc == 2
        assert f"mounted at {mnt}" in stderr and "--unmount" in stderr
        assert healthy.read() == bytes([PATTERN]) * healthy.size
        assert busy.read(1 << 20) == before
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_drive_opened_exclusively_elsewhere_is_busy(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    make_image(tmp_path / "img", 2 << 20)
    healthy = loop_factory(4 << 20, fill=PATTERN)
    held = loop_factory(4 << 20, fill=PATTERN)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os,sys; os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL);"
         " print('held', flush=True); sys.stdin.read()", held.path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        rc, _, stderr = run(flash_args(tmp_path / "img", healthy.path, held.path))
        assert rc == 2
        # Not mounted: --unmount would not help; the refusal names the program that holds it.
        assert f"{held.path} is open in python (pid {holder.pid})" in stderr, stderr
        assert "--unmount" not in stderr
        assert healthy.read() == bytes([PATTERN]) * healthy.size
    finally:
        holder.communicate("")


def test_crawling_drive_is_declared_stalled(loop_factory: Callable[..., Loop], throttle,
                                            tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", 6 << 20)
    fast = [loop_factory(8 << 20, fill=PATTERN) for _ in range(2)]
    slow = loop_factory(8 << 20, fill=PATTERN)
    add = throttle((slow, 256 << 10))
    started = time.monotonic()
    rc, events, stderr = run(
        flash_args(tmp_path / "img", fast[0].path, slow.path, fast[1].path,
                   extra=("--stall-timeout", "1")),
        preexec=lambda: add(os.getpid()))
    assert rc == 1, stderr
    assert statuses(events) == {fast[0].path: "ok", slow.path: "failed", fast[1].path: "ok"}
    assert "stalled: only" in result_of(events, slow.path)["error"]  # crawling is no progress
    for loop in fast:
        assert loop.read(len(image)) == image
    assert first_bucket_is_not_image(slow, image)
    # The crawl would need 24 s for the image; the run ends once the stall is seen.
    assert time.monotonic() - started < 20


def _wait_for(proc: subprocess.Popen, predicate: Callable[[dict], bool]) -> list[dict]:
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        seen.append(event)
        if predicate(event):
            return seen
    raise AssertionError(f"the run ended before the expected event: {seen[-3:]}")


POINTS = {
    "before-writing": lambda e: e["event"] == "phase" and e["phase"] == "checksum",
    "mid-write": lambda e: e["event"] == "progress" and e["phase"] == "writing"
    and e["bytes"] >= 2 * BUCKET,
    "mid-verify": lambda e: e["event"] == "phase" and e["phase"] == "verifying",
}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["INT", "TERM", "HUP"])
@pytest.mark.parametrize("point", list(POINTS))
def test_signal_stops_everything_cleanly(sig: signal.Signals, point: str,
                                         loop_factory: Callable[..., Loop], throttle,
                                         tmp_path: Path) -> None:
    size = 8 << 20
    data = os.urandom(size)
    drives = [loop_factory(size, fill=PATTERN) for _ in range(2)]
    limits = [(d, 4 << 20) for d in drives]
    extra: tuple[str, ...] = ()
    if point == "before-writing":
        # The image on a slow drive of its own, so that its checksum takes a while.
        source = loop_factory(size)
        source.backing.write_bytes(data)
        image: str = source.path
        limits.append((source, 2 << 20))
        import hashlib
        extra = ("--sha256", hashlib.sha256(data).hexdigest())
    else:
        (tmp_path / "img").write_bytes(data)
        image = str(tmp_path / "img")
    add = throttle(*limits)
    proc = subprocess.Popen(flash_args(image, *(d.path for d in drives), extra=extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, preexec_fn=lambda: add(os.getpid()))
    try:
        _wait_for(proc, POINTS[point])
        proc.send_signal(sig)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err
    assert took < 3.0, f"took {took:.1f} s to stop"
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["event"] == "summary" and events[-1]["ok"] is False
    assert set(statuses(events).values()) == {"cancelled"}
    for drive in drives:
        assert first_bucket_is_not_image(drive, data)
        if point == "before-writing":
            assert drive.read() == bytes([PATTERN]) * size
    assert "Traceback" not in err


def _cut(path: Path, image: bytes) -> None:
    os.truncate(path, 6 << 20)


def _edit_in_place(path: Path, image: bytes) -> None:
    with open(path, "r+b") as f:  # one byte already written, one not yet read
        for offset in (BUCKET + 7, 20 * BUCKET + 7):
            f.seek(offset)
            f.write(bytes([image[offset] ^ 0xFF]))


@pytest.mark.parametrize(("change", "error"), [
    # Where the reader stood when the file was cut depends on the machine's load.
    (_cut, r"{drive}: the image ended at byte \d+ but should hold 25165824 bytes \(was it "
           r"truncated or changed while being read\?\)"),
    # Same size: every drive matches what was read, part old and part new, so the read-back
    # alone would pass; none holds the image.
    (_edit_in_place, r"{drive}: the image {path} changed while it was read \(it was written "
                     r"to\): no drive holds it"),
], ids=["truncated", "written-in-place"])
def test_image_changed_while_being_read(loop_factory: Callable[..., Loop], throttle,
                                        tmp_path: Path, change: Callable[[Path, bytes], None],
                                        error: str) -> None:
    path = tmp_path / "img"
    image = make_image(path, 24 << 20)
    drives = [loop_factory(32 << 20, fill=PATTERN) for _ in range(2)]
    add = throttle(*[(d, 4 << 20) for d in drives])
    proc = subprocess.Popen(flash_args(path, *(d.path for d in drives), extra=("--buckets", "2")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, preexec_fn=lambda: add(os.getpid()))
    try:
        _wait_for(proc, POINTS["mid-write"])
        change(path, image)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    events = [json.loads(line) for line in out.splitlines()]
    assert set(statuses(events).values()) == {"failed"}
    for drive in drives:
        said = result_of(events, drive.path)["error"]
        assert re.fullmatch(error.format(drive=re.escape(drive.path), path=re.escape(str(path))),
                            said), said
        assert first_bucket_is_not_image(drive, image)


def test_second_ctrl_c_exits_at_once(loop_factory: Callable[..., Loop], throttle,
                                     tmp_path: Path) -> None:
    data = os.urandom(8 << 20)
    (tmp_path / "img").write_bytes(data)
    drive = loop_factory(8 << 20, fill=PATTERN)
    add = throttle((drive, 256 << 10))  # a 1 MiB write takes 4 s: the first stop is slow
    proc = subprocess.Popen(flash_args(tmp_path / "img", drive.path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: add(os.getpid()))
    try:
        _wait_for(proc, lambda e: e["event"] == "phase" and e["phase"] == "writing")
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        assert "Ctrl-C again to quit at once" in proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert '"event": "summary"' not in out  # it did not wait to stop in order
    assert first_bucket_is_not_image(drive, data)


@pytest.mark.parametrize("how", ["stall", "cancel"])
def test_a_drive_that_hangs_after_its_write_cannot_hang_the_run(
        how: str, loop_factory: Callable[..., Loop], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The head (and the stamp before it) is written by the drive's own thread: it too must
    give up in time."""
    import threading

    from popsicle_py import blockdev
    from popsicle_py.flash import FlashJob, FlashOptions, open_targets
    from popsicle_py.images import open_image

    data = os.urandom(3 << 20)
    (tmp_path / "img").write_bytes(data)
    drive = loop_factory(4 << 20, fill=PATTERN)
    hung, release, cancel = threading.Event(), threading.Event(), threading.Event()
    write = blockdev.BlockDevice.write

    def hanging_write(self: blockdev.BlockDevice, view: memoryview) -> int:
        if self.pos == 0 and threading.current_thread().name.startswith("popsicle-writer"):
            hung.set()
            if how == "cancel":
                cancel.set()
            release.wait(30)  # a stick whose write does not come back
        return write(self, view)

    monkeypatch.setattr(blockdev.BlockDevice, "write", hanging_write)

    class Target:
        path, size, logical_block_size = drive.path, drive.size, 512

    started = time.monotonic()
    try:
        summary = FlashJob(open_image(str(tmp_path / "img")), open_targets([Target()]),
                           FlashOptions(bucket_size=BUCKET, stall_timeout=1.0),
                           lambda event: None, cancel.is_set).run()
        took = time.monotonic() - started
    finally:
        release.set()
    assert hung.is_set()
    (result,) = summary.results
    if how == "stall":
        assert result.status == "failed" and "stalled" in (result.error or "")
    else:
        assert result.status == "cancelled" and summary.cancelled
    assert took < 10
    assert first_bucket_is_not_image(drive, data)


#: A run whose main thread is handed a worker's mask mid-run, as umockdev 0.17's preload does
#: (its issue 252: one shared variable for every thread's saved mask).
_CLOBBERED = """
import signal, sys, threading
from popsicle_py.engine.supervisor import Supervisor
from popsicle_py.errors import Cancelled
from popsicle_py.records import record
from popsicle_py.signals import Cancellation

@record
class Errored:
    id: int
    error: OSError

cancel = Cancellation()
idle = threading.Event()
def task(lane):
    lane.post("tick")
    while not lane.stopped:
        idle.wait(0.05)
def callback(message):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                                              signal.SIGQUIT})
    print("ready", flush=True)
with cancel.installed():
    try:
        Supervisor(["a"], callback, cancel, stall_timeout=None, errored=Errored,
                   name="t").run(task)
    except Cancelled:
        sys.exit(cancel.exit_status)
"""


def test_a_main_thread_handed_a_blocked_mask_still_hears_sigterm() -> None:
    """The main thread takes the stop signals back at each tick: with the mask a preloaded
    library left it, SIGTERM stayed pending and the run never ended."""
    proc = subprocess.Popen([sys.executable, "-c", _CLOBBERED], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 143, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
        proc.wait()
