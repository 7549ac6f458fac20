"""Compressed images at every drive's own speed: the spill file (issue 16).

A stream cannot be re-read, so its laggards read the spill file the reader keeps.  These tests
block a slow destination outright (no timing): with a spill the others finish while it is
blocked; without room for one, every drive still finishes, in lock-step, with a note.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Loop, needs_root, popsicle_cmd
from loopdev import tiny_tmpfs

from popsicle_py import BusWriter, BusWriterMessage

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
    data = os.urandom(24 << 20)
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
