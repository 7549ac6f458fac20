"""Compressed images at every drive's own speed: the spill file (issue 16).

A stream cannot be re-read, so its laggards read the spill file the reader keeps.  These tests
block a slow destination outright (no timing): with a spill the others finish while it is
blocked; without room for one, every drive still finishes, in lock-step, with a note.  A raw
image's laggard reads the file itself, and an image that crawls then is the image's fault.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Loop, events_until_summary, needs_root, popsicle_cmd, waits_in_kernel
from faulty import FaultyFile
from loopdev import mounted_ext4, tiny_tmpfs

from popsicle_py import BusWriter, BusWriterMessage
from popsicle_py.errors import SourceStalled

B = 64 << 10
HANG = 20.0


class Source(io.RawIOBase):
    """A stream (no fileno, no seek), like a decompressor."""

    def __init__(self, payload: bytes) -> None:
        super().__init__()
        self._inner = io.BytesIO(payload)

    def readable(self) -> bool:
        return True

    def readinto(self, view: Any) -> int:
        return self._inner.readinto(view)


class Held(io.BytesIO):
    """A destination whose writes past ``after`` bytes wait until ``release`` is set."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after
        self.release = threading.Event()
        self.blocked = threading.Event()

    def write(self, view: Any) -> int:
        if self.tell() + len(view) > self.after and not self.release.is_set():
            self.blocked.set()
            assert self.release.wait(HANG), "never released"
        return super().write(view)


@pytest.fixture
def spill_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "spill"
    directory.mkdir()
    monkeypatch.setenv("TMPDIR", str(directory))
    return directory


def test_laggard_of_a_stream_reads_the_spill_and_the_others_finish(spill_dir: Path) -> None:
    payload = os.urandom(40 * B + 123)
    fast = [io.BytesIO(), io.BytesIO()]
    slow = Held(after=3 * B)
    completed: list[int] = []

    def on_message(msg: Any) -> None:
        if isinstance(msg, BusWriterMessage.Completed):
            completed.append(msg.id)
            if sorted(completed) == [0, 1]:  # both fast ones done while the slow one waits
                assert slow.blocked.is_set() and not slow.release.is_set()
                slow.release.set()

    result = (BusWriter(Source(payload), [*fast, slow], on_message, lambda: False)
              .bucket_size(B).buckets(2).spill_to("").write())
    assert sorted(completed) == [0, 1, 2] and completed[-1] == 2
    assert all(r.ok for r in result)
    for dest in (*fast, slow):
        assert dest.getvalue() == payload
    assert os.listdir(spill_dir) == []  # unlinked from the start: nothing left behind


def test_a_laggard_whose_image_crawls_blames_the_image_not_its_drive(
        faulty_file: Callable[..., FaultyFile]) -> None:
    """A raw image's laggard reads the file on its own; if the disk the image is on starts to
    crawl then, the laggard fails as the image stalled (cause ``source``), never as "a dying
    or fake drive" (before: "stalled: no progress for 2 s" on a sound drive)."""
    payload = os.urandom(40 * B)
    image = faulty_file(payload)
    fast = io.BytesIO()
    slow = Held(after=3 * B)
    errors: list[OSError] = []

    def on_message(msg: Any) -> None:
        if isinstance(msg, BusWriterMessage.Completed) and msg.id == 0:
            assert slow.blocked.is_set() and not slow.release.is_set()
            image.set(crawl=(0, 20_000))  # 20 kB/s from here on: the image's disk, not ours
            slow.release.set()
        elif isinstance(msg, BusWriterMessage.Errored):
            errors.append(msg.why)

    with open(image.path, "rb", buffering=0) as source:
        try:
            result = (BusWriter(source, [fast, slow], on_message, lambda: False)
                      .bucket_size(B).buckets(2).stall_timeout(2).write())
        finally:
            image.clear()  # the abandoned lane's read returns
    assert fast.getvalue() == payload and result[0].ok
    assert [type(e) for e in errors] == [SourceStalled], errors
    assert str(errors[0]).startswith("[Errno 110] reading the image stalled"), errors


def test_without_room_for_a_spill_every_drive_finishes_in_lock_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path / "does-not-exist"))
    payload = os.urandom(12 * B)
    dests = [io.BytesIO(), io.BytesIO()]
    notes: list[str] = []

    def on_message(msg: Any) -> None:
        if isinstance(msg, BusWriterMessage.LockStep):
            notes.append(msg.reason)

    result = (BusWriter(Source(payload), dests, on_message, lambda: False)
              .bucket_size(B).buckets(2).spill_to("").write())
    assert all(r.ok for r in result)
    assert all(d.getvalue() == payload for d in dests)
    assert len(notes) == 1 and "does-not-exist" in notes[0]


@needs_root
@pytest.mark.parametrize(("tool", "why"), [("gzip", "nearly full"),
                                           ("zstd", "not enough room")])
def test_a_spill_without_room_falls_back_to_lock_step(
        loop_factory: Callable[..., Loop], throttle: Callable[..., Any],
        tmp_path: Path, tool: str, why: str) -> None:
    """No room for the spill: from the start when the format records the image's size (zstd),
    else once its filesystem fills up mid-image (gzip), where laggards rejoin the ring.  No
    drive fails for it."""
    data = os.urandom(16 << 20)  # the spill stops at about 8 MiB: mid-image still
    (tmp_path / "img").write_bytes(data)
    subprocess.run([tool, "-q", "-1", "-k", str(tmp_path / "img")], check=True)
    image = tmp_path / ("img.gz" if tool == "gzip" else "img.zst")
    drives = [loop_factory(32 << 20) for _ in range(3)]
    add = throttle((drives[2], 4 << 20))  # the laggard: 4 MB/s, the others unthrottled
    # 256 MiB are always left free: a 264 MiB tmpfs takes about 8 MiB of spill, then it stops.
    with tiny_tmpfs(tmp_path, "264m") as mnt:
        env = {**os.environ, "TMPDIR": str(mnt)}
        proc = subprocess.run(
            [*popsicle_cmd(), "flash", str(image), *(d.path for d in drives),
             "--yes", "--json", "--bucket-size", "1M"], capture_output=True, text=True,
            env=env, stdin=subprocess.DEVNULL, preexec_fn=lambda: add(os.getpid()),
            timeout=120)
        assert os.listdir(mnt) == []
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    notes = [e["text"] for e in events if e["event"] == "note"]
    assert any("slowest one's pace" in n and why in n for n in notes), notes
    for drive in drives:
        assert drive.read(len(data)) == data


def _events_until_summary(proc: subprocess.Popen[bytes],
                          seen: Callable[[list[dict[str, Any]]], None] = lambda events: None
                          ) -> list[dict[str, Any]]:
    """The run's JSON events up to its summary (60 s at most), ``seen`` told after each read."""
    return events_until_summary(proc, time.monotonic() + 60, seen)[0]


def _feed(pipe: Any, data: bytes) -> None:
    """Write ``data`` and close, whatever the reader at the other end does meanwhile."""
    try:
        pipe.write(data)
        pipe.close()
    except (BrokenPipeError, ValueError):  # the run ended (or the test closed it) first
        pass


@needs_root
def test_a_spill_directory_whose_writes_hang_fails_the_run_on_time(
        loop_factory: Callable[..., Loop], tmp_path: Path) -> None:
    """The spill's file system frozen mid-run (as a hung disk under /var/tmp would be): the
    reader's next append never returned, and every drive waited for data, which is never a
    stall: the run hung for good.  The append is on the reader's stall clock now: every
    drive fails on time, naming the spill's directory, and no drive gets the head."""
    store = loop_factory(512 << 20)  # the spill leaves 256 MiB free (sparse in /dev/shm)
    drive = loop_factory(32 << 20, fill=0x5A)
    data = os.urandom(24 << 20)
    with mounted_ext4(store.path) as spill:
        proc = subprocess.Popen(
            [*popsicle_cmd(), "flash", "-", drive.path, "--yes", "--json", "--no-probe",
             "--force", "--bucket-size", "1M", "--stall-timeout", "2"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "TMPDIR": spill})
        assert proc.stdin is not None and proc.stdout is not None
        frozen = False
        try:
            proc.stdin.write(data[: 8 << 20])
            proc.stdin.flush()

            def seen(events: list[dict[str, Any]]) -> None:
                nonlocal frozen
                if not frozen and any(e["event"] == "progress" for e in events):
                    subprocess.run(["fsfreeze", "-f", spill], check=True)
                    frozen = True
                    # The reader spills the rest: its write hangs, and so may this feed.
                    threading.Thread(target=_feed, args=(proc.stdin, data[8 << 20 :]),
                                     daemon=True).start()

            events = _events_until_summary(proc, seen)
        finally:
            if frozen:
                subprocess.run(["fsfreeze", "-u", spill], check=True)
            if proc.poll() is None:
                proc.wait(timeout=60)
    [result] = events[-1]["results"]
    assert result["status"] == "failed", result
    assert f"keeping the decompressed image in {spill} stalled" in result["error"], result
    assert drive.head_is_safe(data, 0x5A), drive.read(32)


@needs_root
def test_a_spill_directory_hung_from_the_start_leaves_the_drives_in_lock_step(
        loop_factory: Callable[..., Loop]) -> None:
    """TMPDIR frozen before the run (a hung NFS /var/tmp): making the spill's directory never
    returned, on the calling thread, and nothing, not even Ctrl-C, was heard.  It is made on
    a watched worker now: after the stall timeout the drives go on in lock-step, with a note
    that names the directory, and end ok."""
    store = loop_factory(512 << 20)
    drive = loop_factory(32 << 20, fill=0x5A)
    data = os.urandom(8 << 20)
    with mounted_ext4(store.path) as spill:
        subprocess.run(["fsfreeze", "-f", spill], check=True)
        try:
            proc = subprocess.Popen(
                [*popsicle_cmd(), "flash", "-", drive.path, "--yes", "--json", "--no-probe",
                 "--force", "--stall-timeout", "2"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": spill})
            assert proc.stdout is not None
            threading.Thread(target=_feed, args=(proc.stdin, data), daemon=True).start()
            events = _events_until_summary(proc)
        finally:
            subprocess.run(["fsfreeze", "-u", spill], check=True)
        proc.wait(timeout=60)
    [result] = events[-1]["results"]
    assert result["status"] == "ok", result
    assert drive.read(len(data)) == data
    notes = [e["text"] for e in events if e["event"] == "note"]
    assert any(f"{spill} did not answer for 2 s" in n for n in notes), notes


@needs_root
def test_a_spill_closed_under_a_hung_append_keeps_its_number_until_the_append_returns(
        loop_factory: Callable[..., Loop]) -> None:
    """The run closes the spill while an abandoned reader's append hangs (a frozen spill
    disk). Closed then, its descriptor's number went to the next file opened (another
    stick, in watch), where that append's bytes would land. Now the number points at
    /dev/null until the append returns, and is freed then."""
    from popsicle_py.engine.spill import Spill

    store = loop_factory(512 << 20)  # the spill leaves 256 MiB free (sparse in /dev/shm)
    with mounted_ext4(store.path) as where:
        spill = Spill.create(where, None)
        assert isinstance(spill, Spill)
        number = spill.fd
        subprocess.run(["fsfreeze", "-f", where], check=True)
        try:
            appended: list[bool] = []
            writer = threading.Thread(
                target=lambda: appended.append(spill.append(0, memoryview(b"x" * 4096))))
            writer.start()
            deadline = time.monotonic() + 30
            while not waits_in_kernel(os.getpid(), "percpu_rwsem_wait"):
                assert time.monotonic() < deadline, "the append did not reach the frozen disk"
                time.sleep(0.01)
            spill.close()
            other = os.open(os.devnull, os.O_RDONLY)
            os.close(other)
            assert other != number, "the hung append's number was given to the next open"
            assert os.readlink(f"/proc/self/fd/{number}") == os.devnull
        finally:
            subprocess.run(["fsfreeze", "-u", where], check=True)
        writer.join(timeout=30)
        assert appended == [True]
        assert not os.path.exists(f"/proc/self/fd/{number}") or \
            os.readlink(f"/proc/self/fd/{number}") != os.devnull  # freed (or reused since)
