"""The broadcast engine (issue 2): BusWriter and BusVerifier on real files and loop devices.

Every test checks what a user of the library sees: the bytes on each destination, the messages
the callback receives (on the calling thread), the result and the exceptions.  Nothing waits for
timing with a sleep: slow and stuck destinations block on Events that the test releases, and every
run has a deadline (a ``cancel`` that fires after 20 s) so that a hang fails instead of hanging.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popsicle_py import (
    AllDestinationsFailed,
    BusVerifier,
    BusVerifierMessage,
    BusWriter,
    BusWriterMessage,
    Cancelled,
)
from popsicle_py.blockdev import OpenSpec, open_for_writing
from popsicle_py.buffers import is_aligned
from popsicle_py.engine import CANCEL_GRACE, HEAD
from popsicle_py.errors import SourceReadFailed
from popsicle_py.pacing import Clock

B = 64 << 10  # the bucket size most tests use: small, so that runs are fast
HANG = 20.0  # no run in this file may take this long; a run that does is cancelled and fails


def data(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("popsicle-")]


def assert_no_engine_threads(timeout: float = 2.0) -> None:
    end = time.monotonic() + timeout
    for t in engine_threads():
        t.join(max(0.0, end - time.monotonic()))
    assert [t.name for t in engine_threads()] == []


@pytest.fixture(autouse=True)
def no_threads_left() -> Iterator[None]:
    """Every test must end with no engine thread alive (after its own cleanup)."""
    yield
    assert_no_engine_threads()


class Recorder:
    """A callback that records messages and the thread each one arrived on."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.threads: set[int] = set()
        self.hooks: list[Callable[[Any], object]] = []

    def __call__(self, message: Any) -> None:
        self.threads.add(threading.get_ident())
        self.messages.append(message)
        for hook in self.hooks:
            hook(message)

    def of(self, kind: type[Any], id: int | None = None) -> list[Any]:
        return [m for m in self.messages
                if isinstance(m, kind) and (id is None or m.id == id)]

    def written(self, id: int) -> list[int]:
        return [m.bytes_written for m in self.of(BusWriterMessage.Written, id)]

    def read(self, id: int) -> list[int]:
        return [m.bytes_read for m in self.of(BusVerifierMessage.Read, id)]


class Deadline:
    """A ``cancel`` that turns true when the test sets it or when the run hangs."""

    def __init__(self, limit: float = HANG) -> None:
        self.end = time.monotonic() + limit
        self.flag = threading.Event()
        self.first_true: float | None = None
        self.on_cancel: list[Callable[[], None]] = []

    def set(self) -> None:
        self.flag.set()

    def __call__(self) -> bool:
        hit = self.flag.is_set() or time.monotonic() > self.end
        if hit and self.first_true is None:
            self.first_true = time.monotonic()
            for action in self.on_cancel:
                action()
        return hit


class Stream:
    """A non-seekable source: only ``readinto``, counting what was read; may fail mid-stream."""

    def __init__(self, payload: bytes, fail_at: int | None = None,
                 error: OSError | None = None) -> None:
        self.inner = io.BytesIO(payload)
        self.pos = 0
        self.fail_at = fail_at
        self.error = error
        self.after_read: Callable[[int], None] | None = None

    def readinto(self, view: Any) -> int:
        if self.fail_at is not None and self.pos + len(view) > self.fail_at:
            assert self.error is not None
            raise self.error
        n = self.inner.readinto(view)
        self.pos += n
        if self.after_read is not None:
            self.after_read(self.pos)
        return n


class Sink:
    """An in-memory destination with configurable misbehaviour."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.calls = 0
        self.written = 0

    def write(self, view: Any) -> int:
        self.calls += 1
        n = self.buf.write(view)
        self.written += n
        return n

    def seek(self, offset: int) -> int:
        return self.buf.seek(offset)

    def getvalue(self) -> bytes:
        return self.buf.getvalue()


class FailAfter(Sink):
    """Accepts ``limit`` bytes, then raises ``error`` on every write."""

    def __init__(self, limit: int, error: BaseException) -> None:
        super().__init__()
        self.limit = limit
        self.error = error

    failures = 0

    def write(self, view: Any) -> int:
        if self.written + len(view) > self.limit:
            self.calls += 1
            self.failures += 1
            raise self.error
        return super().write(view)


class Blocking(Sink):
    """Blocks inside any ``write`` that would go past ``after`` bytes until ``release`` is set."""

    def __init__(self, after: int = 0) -> None:
        super().__init__()
        self.after = after
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, view: Any) -> int:
        if self.written + len(view) > self.after and not self.release.is_set():
            self.entered.set()
            self.release.wait()
        return super().write(view)


def files(tmp_path: Path, count: int) -> list[Any]:
    return [open(tmp_path / f"dest{i}.img", "w+b") for i in range(count)]


def contents(dest: Any) -> bytes:
    if isinstance(dest, Sink):
        return dest.getvalue()
    if isinstance(dest, io.BytesIO):
        return dest.getvalue()
    dest.flush()
    with open(dest.name, "rb") as f:
        return f.read()


def check_written(rec: Recorder, id: int, size: int) -> None:
    """Written counts for ``id`` are cumulative, increasing, and end at ``size``."""
    counts = rec.written(id)
    assert counts == sorted(set(counts)), counts
    assert all(c > 0 for c in counts)
    assert (counts[-1] if counts else 0) == size


def source_file(tmp_path: Path, payload: bytes) -> Any:
    path = tmp_path / "source.img"
    path.write_bytes(payload)
    return open(path, "rb")


# --------------------------------------------------------------------------------------------
# Sizes and destination counts.


@pytest.mark.parametrize("size", [0, 1, B - 1, B, B + 1, 7 * B + 4099])
@pytest.mark.parametrize("count", [1, 16])
@pytest.mark.parametrize("kind", ["stream", "file"])
def test_every_destination_holds_exactly_the_source(tmp_path: Path, size: int, count: int,
                                                    kind: str) -> None:
    payload = data(size, seed=size)
    source = Stream(payload) if kind == "stream" else source_file(tmp_path, payload)
    dests = files(tmp_path, count)
    rec = Recorder()
    try:
        result = BusWriter(source, dests, rec, Deadline()).bucket_size(B).buckets(3).write()
        for i, dest in enumerate(dests):
            assert contents(dest) == payload
            check_written(rec, i, size)
            completed = rec.of(BusWriterMessage.Completed, i)
            assert completed == [BusWriterMessage.Completed(i)]
            # Completed is the destination's last message.
            assert [m for m in rec.messages if m.id == i][-1] == completed[0]
        assert rec.of(BusWriterMessage.Errored) == []
        assert rec.threads == {threading.get_ident()}
        assert result.size == size
        assert [(r.id, r.bytes_written, r.error) for r in result] == [
            (i, size, None) for i in range(count)]
    finally:
        for d in dests:
            d.close()
        if not isinstance(source, Stream):  # the file
            source.close()


def test_no_destinations_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="destination"):
        BusWriter(io.BytesIO(b"x"), [], Recorder(), Deadline())
    with pytest.raises(ValueError, match="destination"):
        BusVerifier(io.BytesIO(b"x"), [], Recorder(), Deadline())


def test_defaults_are_16_mib_buckets() -> None:
    payload = data(1000)
    result = BusWriter(io.BytesIO(payload), [io.BytesIO()], Recorder(), Deadline()).write()
    assert result.bucket_size == 16 << 20


def test_short_writes_are_completed(tmp_path: Path) -> None:
    class Trickle(Sink):
        def write(self, view: Any) -> int:
            return super().write(view[:1000])

    payload = data(3 * B + 5)
    dest = Trickle()
    rec = Recorder()
    BusWriter(Stream(payload), [dest], rec, Deadline()).bucket_size(B).write()
    assert dest.getvalue() == payload
    check_written(rec, 0, len(payload))
    assert rec.of(BusWriterMessage.Completed) == [BusWriterMessage.Completed(0)]


def test_destinations_are_fsynced_before_completed(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Completed must come after the fsync has returned, for every destination.

    Each fsync is held until the calling thread next polls ``cancel()``: had a Completed been
    posted before its fsync, it would be delivered (and seen here) while the fsync still waits.
    """
    synced: set[int] = set()
    entered = threading.Event()
    gate = threading.Event()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        entered.set()
        gate.wait(HANG)
        try:
            real_fsync(fd)
        finally:
            synced.add(fd)  # returned, or refused (EINVAL on /dev/null, which is not an error)

    monkeypatch.setattr(os, "fsync", fsync)
    deadline = Deadline()

    def cancel() -> bool:
        if entered.is_set():  # let the waiting fsync go on, now that Completed had its chance
            entered.clear()
            gate.set()
            gate.clear()
        return deadline()

    dests = files(tmp_path, 2)
    early: list[int] = []
    with open(os.devnull, "wb") as null:  # fsync on /dev/null fails with EINVAL: not an error
        fds = [d.fileno() for d in dests] + [null.fileno()]
        rec = Recorder()
        rec.hooks.append(lambda m: isinstance(m, BusWriterMessage.Completed)
                         and fds[m.id] not in synced and early.append(m.id))
        BusWriter(Stream(data(B)), [*dests, null], rec, cancel).bucket_size(B).write()
        assert sorted(m.id for m in rec.of(BusWriterMessage.Completed)) == [0, 1, 2]
        assert early == [], f"Completed before fsync for {early}"
        assert synced == set(fds)
    for d in dests:
        d.close()


# --------------------------------------------------------------------------------------------
# with_bucket: the caller's buffer.


def test_with_bucket_reuses_an_mmap(tmp_path: Path) -> None:
    bucket = mmap.mmap(-1, B)
    payload = data(3 * B + 100)
    dest = io.BytesIO()
    result = (BusWriter(Stream(payload), [dest], Recorder(), Deadline())
              .with_bucket(bucket).buckets(2).write())
    assert dest.getvalue() == payload
    assert result.bucket_size == B
    # The mmap is the ring's first bucket: it held buckets 0 and 2 of the source, in turn.
    assert bucket[:] == payload[2 * B : 3 * B]
    bucket.close()


def test_with_bucket_bytearray_sets_only_the_size() -> None:
    keep = []
    bucket = bytearray(B)
    while is_aligned(bucket):  # the docstring's case is an unaligned buffer; find one
        keep.append(bucket)
        bucket = bytearray(B)
    payload = data(2 * B + 1)
    dest = io.BytesIO()
    rec = Recorder()
    result = BusWriter(Stream(payload), [dest], rec, Deadline()).with_bucket(bucket).write()
    assert dest.getvalue() == payload
    assert result.bucket_size == B
    # Calls are paced to the drive's speed, but never cross a bucket of the given size.
    assert {B, 2 * B, 2 * B + 1} <= set(rec.written(0))
    assert bucket == bytearray(B)  # an aligned bucket was used in its place


def test_with_bucket_rejects_an_empty_buffer() -> None:
    with pytest.raises(ValueError):
        BusWriter(io.BytesIO(), [io.BytesIO()], Recorder(), Deadline()).with_bucket(bytearray())


# --------------------------------------------------------------------------------------------
# Failing destinations.


@pytest.mark.parametrize("error", [OSError(errno.ENODEV, "unplugged"), RuntimeError("bug")])
def test_a_failing_destination_leaves_the_others_alone(error: BaseException) -> None:
    payload = data(10 * B + 3)
    limit = 3 * B + 10
    bad = FailAfter(limit, error)
    good = [Sink() for _ in range(3)]
    rec = Recorder()
    result = BusWriter(Stream(payload), [good[0], bad, *good[1:]], rec,
                       Deadline()).bucket_size(B).buckets(2).write()
    errored = rec.of(BusWriterMessage.Errored)
    assert len(errored) == 1 and errored[0].id == 1
    assert isinstance(errored[0].why, OSError)
    if isinstance(error, OSError):
        assert errored[0].why is error
    else:
        assert errored[0].why.__cause__ is error and "bug" in str(errored[0].why)
    assert rec.of(BusWriterMessage.Completed, 1) == []
    assert bad.getvalue() == payload[: 3 * B]
    assert bad.failures == 1  # a final error is not retried
    for i in (0, 2, 3):
        assert rec.of(BusWriterMessage.Completed, i) == [BusWriterMessage.Completed(i)]
    for g in good:
        assert g.getvalue() == payload
    assert result[1].error is errored[0].why and result[1].bytes_written == 3 * B
    assert [r.ok for r in result] == [True, False, True, True]


def test_every_destination_failing_raises() -> None:
    dests = [FailAfter(n * B, OSError(errno.ENODEV, f"gone {n}")) for n in (0, 1, 2)]
    rec = Recorder()
    with pytest.raises(AllDestinationsFailed) as info:
        BusWriter(Stream(data(20 * B)), dests, rec, Deadline()).bucket_size(B).write()
    assert [r.bytes_written for r in info.value.results] == [0, B, 2 * B]
    assert all(r.error is not None and r.error.errno == errno.ENODEV
               for r in info.value.results)
    assert sorted(m.id for m in rec.of(BusWriterMessage.Errored)) == [0, 1, 2]
    assert rec.of(BusWriterMessage.Completed) == []


def test_a_write_of_zero_bytes_is_an_error_not_a_loop() -> None:
    class Full(Sink):
        def write(self, view: Any) -> int:
            self.calls += 1
            return 0

    full, good = Full(), Sink()
    payload = data(4 * B)
    rec = Recorder()
    result = BusWriter(Stream(payload), [full, good], rec, Deadline()).bucket_size(B).write()
    [errored] = rec.of(BusWriterMessage.Errored)
    assert errored.id == 0 and errored.why.errno == errno.EIO
    assert full.calls == 1
    assert good.getvalue() == payload
    assert rec.of(BusWriterMessage.Completed) == [BusWriterMessage.Completed(1)]
    assert not result[0].ok and result[1].ok


def test_transient_errors_are_retried() -> None:
    class Flaky(Sink):
        failures = 2

        def write(self, view: Any) -> int:
            if self.written >= B and self.failures:
                self.failures -= 1
                self.calls += 1
                raise OSError(errno.EIO, "hub reset")
            return super().write(view)

    flaky = Flaky()
    payload = data(3 * B + 1)
    rec = Recorder()
    BusWriter(Stream(payload), [flaky], rec, Deadline()).bucket_size(B).write()
    assert flaky.getvalue() == payload
    assert flaky.failures == 0
    assert rec.of(BusWriterMessage.Errored) == []
    assert rec.of(BusWriterMessage.Completed) == [BusWriterMessage.Completed(0)]
    check_written(rec, 0, len(payload))


def test_enospc_is_final_at_once() -> None:
    full = FailAfter(B, OSError(errno.ENOSPC, "No space left on device"))
    rec = Recorder()
    with pytest.raises(AllDestinationsFailed):
        BusWriter(Stream(data(4 * B)), [full], rec, Deadline()).bucket_size(B).write()
    assert full.failures == 1  # good writes, then one failed: never retried
    [errored] = rec.of(BusWriterMessage.Errored)
    assert errored.why.errno == errno.ENOSPC


@pytest.mark.root
def test_a_loop_device_dying_with_enospc(loop_factory: Callable[..., Any],
                                         dying_loop: Callable[..., Any]) -> None:
    size = 4 << 20
    image = data(size + 777)
    healthy = [loop_factory(8 << 20) for _ in range(2)]
    dying = dying_loop(8 << 20, good=1 << 20)
    loops = [healthy[0], dying, healthy[1]]
    devices = [open_for_writing(OpenSpec(lp.path, lp.size)) for lp in loops]
    rec = Recorder()
    try:
        result = BusWriter(io.BytesIO(image), devices, rec, Deadline()).bucket_size(
            256 << 10).write()
    finally:
        for d in devices:
            d.close()
    [errored] = rec.of(BusWriterMessage.Errored)
    assert errored.id == 1 and errored.why.errno == errno.ENOSPC
    assert rec.of(BusWriterMessage.Completed, 1) == []
    assert not result[1].ok and result[1].bytes_written < len(image)
    for i in (0, 2):
        assert rec.of(BusWriterMessage.Completed, i) == [BusWriterMessage.Completed(i)]
        check_written(rec, i, len(image))
        assert loops[i].read(len(image)) == image


# --------------------------------------------------------------------------------------------
# Back-pressure and laggards.


class CountedFile(io.FileIO):
    """A real (seekable) file source whose reads are counted like a Stream's."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "rb")
        self.pos = 0
        self.after_read: Callable[[int], None] | None = None

    def readinto(self, view: Any) -> int:
        n = super().readinto(view) or 0
        self.pos += n
        if self.after_read is not None:
            self.after_read(self.pos)
        return n


@pytest.mark.parametrize("kind", ["stream", "file without laggards"])
def test_a_slow_destination_holds_the_source_in_lock_step(tmp_path: Path, kind: str) -> None:
    """The reader blocks: never more than (buckets + 1) buckets ahead of the slowest drive."""
    buckets = 3
    payload = data(20 * B + 11)
    source: Any
    if kind == "stream":
        source = Stream(payload)
    else:
        (tmp_path / "source.img").write_bytes(payload)
        source = CountedFile(tmp_path / "source.img")
    slow = Blocking(after=B)
    fast = [Sink() for _ in range(3)]
    overrun = threading.Event()
    read_ahead: list[int] = []

    def after_read(pos: int) -> None:
        read_ahead.append(pos - slow.written)
        if pos - slow.written > (buckets + 1) * B:
            overrun.set()

    source.after_read = after_read
    rec = Recorder()
    released: list[int] = []

    def on_message(m: Any) -> None:
        if slow.release.is_set():
            return
        if all(f.written >= (buckets + 1) * B for f in fast):
            # The fast ones are as far as the ring lets them go; give a reader that ignored
            # back-pressure time to show it, then release the slow one.
            assert slow.entered.wait(5)
            assert not overrun.wait(0.3)
            released.append(source.pos)
            assert rec.of(BusWriterMessage.Completed) == []
            slow.release.set()

    rec.hooks.append(on_message)
    deadline = Deadline()
    deadline.on_cancel.append(slow.release.set)
    BusWriter(source, [*fast, slow], rec, deadline).bucket_size(B).buckets(buckets).laggards(
        kind == "stream").write()
    if kind != "stream":
        source.close()
    assert released, "the fast destinations never got a full ring ahead"
    assert released[0] <= (buckets + 1) * B + B
    assert max(read_ahead) <= (buckets + 1) * B
    for i, d in enumerate([*fast, slow]):
        assert d.getvalue() == payload
        assert rec.of(BusWriterMessage.Completed, i) == [BusWriterMessage.Completed(i)]


def test_a_stuck_destination_does_not_hold_back_a_file_source(tmp_path: Path) -> None:
    """Issue 9: with a seekable source, the laggard leaves the ring and goes on alone."""
    payload = data(40 * B + 123)
    source = source_file(tmp_path, payload)
    slow = Blocking(after=B)
    fast = [Sink() for _ in range(3)]
    rec = Recorder()

    def on_message(m: Any) -> None:
        if isinstance(m, BusWriterMessage.Completed) and m.id < 3:
            assert not slow.release.is_set()  # completed while the slow one is still stuck
            assert slow.written <= B
            if len(rec.of(BusWriterMessage.Completed)) == 3:
                slow.release.set()

    rec.hooks.append(on_message)
    deadline = Deadline()
    deadline.on_cancel.append(slow.release.set)
    try:
        result = BusWriter(source, [*fast, slow], rec, deadline).bucket_size(B).buckets(
            2).write()
    finally:
        source.close()
    assert deadline.first_true is None, "the run hung"
    for i, d in enumerate([*fast, slow]):
        assert d.getvalue() == payload
        assert rec.of(BusWriterMessage.Completed, i) == [BusWriterMessage.Completed(i)]
        check_written(rec, i, len(payload))
    assert [m.id for m in rec.of(BusWriterMessage.Completed)][-1] == 3
    assert all(r.ok for r in result)


@pytest.mark.root
def test_a_throttled_loop_device_does_not_hold_back_fast_ones(
        tmp_path: Path, loop_factory: Callable[..., Any],
        throttle: Callable[..., Callable[[int], None]]) -> None:
    """Real drives at different speeds (blkio throttle): the fast ones finish first."""
    size = 2 << 20
    payload = data(size)
    loops = [loop_factory(4 << 20) for _ in range(3)]
    # 512 KiB/s: the slow one needs about 4 s, so the fast ones have 2 s (their 2 MiB, the
    # laggard patience, a loaded machine) to finish before it is half-way.
    throttle((loops[2], 1 << 19))(os.getpid())
    devices = [open_for_writing(OpenSpec(lp.path, lp.size)) for lp in loops]
    source = source_file(tmp_path, payload)
    rec = Recorder()
    slow_progress_at_fast_end: list[int] = []

    def on_message(m: Any) -> None:
        if isinstance(m, BusWriterMessage.Completed) and m.id < 2:
            slow_progress_at_fast_end.append((rec.written(2) or [0])[-1])

    rec.hooks.append(on_message)
    try:
        BusWriter(source, devices, rec, Deadline()).bucket_size(B).buckets(2).write()
    finally:
        source.close()
        for d in devices:
            d.close()
    assert [m.id for m in rec.of(BusWriterMessage.Completed)][-1] == 2
    assert len(slow_progress_at_fast_end) == 2
    assert max(slow_progress_at_fast_end) < size // 2
    for lp in loops:
        assert lp.read(size) == payload


def test_stall_timeout_abandons_a_stuck_destination() -> None:
    stuck = Blocking(after=B)
    good = [Sink(), Sink()]
    payload = data(12 * B)
    rec = Recorder()
    try:
        result = (BusWriter(Stream(payload), [good[0], stuck, good[1]], rec, Deadline())
                  .bucket_size(B).buckets(2).stall_timeout(0.5).write())
        assert stuck.entered.is_set() and not stuck.release.is_set()  # returned without it
        [errored] = rec.of(BusWriterMessage.Errored)
        assert errored.id == 1 and "stalled" in str(errored.why)
        assert errored.why.errno == errno.ETIMEDOUT
        assert rec.of(BusWriterMessage.Completed, 1) == []
        assert sorted(m.id for m in rec.of(BusWriterMessage.Completed)) == [0, 2]
        assert good[0].getvalue() == good[1].getvalue() == payload
        assert result[1].error is errored.why
    finally:
        stuck.release.set()
    assert_no_engine_threads()
    assert stuck.written <= B + B  # once released, the abandoned worker stops


def test_a_clock_counts_small_requests_answered_as_progress_and_says_what_moved() -> None:
    """Sixteen one-block requests answered within the stall timeout are progress (a capacity
    probe on a stick slow at small writes); fewer are a stall that names them, not KiB."""
    clock = Clock()
    clock.waiting = False
    clock.last_progress -= 10  # long past a 1 s limit
    for _ in range(15):
        clock.answered()
    assert clock.stalled(time.monotonic(), 1.0)
    assert clock.stall_reason(1.0) == ("stalled: only 15 small requests answered in 1 s (a dying "
                                       "or fake drive?)")
    clock.answered()
    assert not clock.stalled(time.monotonic(), 1.0) and clock.answers == 0
    clock.answered()  # one answer, then a hang: no progress
    assert clock.stall_reason(1.0) == "stalled: no progress for 1 s"
    clock.advance(300 << 10)  # bytes say what moved, whatever was answered
    assert clock.stall_reason(1.0) == ("stalled: only 300 KiB in 1 s (a dying or fake drive?)")


# --------------------------------------------------------------------------------------------
# Cancellation and source errors.


def test_cancel_before_the_first_bucket() -> None:
    source = Stream(data(50 * B))
    dests = [Sink() for _ in range(4)]
    rec = Recorder()
    deadline = Deadline()
    deadline.set()
    with pytest.raises(Cancelled):
        BusWriter(source, dests, rec, deadline).bucket_size(B).write()
    assert rec.of(BusWriterMessage.Completed) == []
    assert source.pos < 50 * B


def test_cancel_mid_write() -> None:
    source = Stream(data(200 * B))
    dests = [Sink() for _ in range(4)]
    rec = Recorder()
    deadline = Deadline()
    rec.hooks.append(lambda m: deadline.set() if isinstance(m, BusWriterMessage.Written)
                     and m.bytes_written >= 5 * B else None)
    with pytest.raises(Cancelled):
        BusWriter(source, dests, rec, deadline).bucket_size(B).buckets(2).write()
    assert deadline.first_true is not None
    assert time.monotonic() - deadline.first_true < 1.0
    assert rec.of(BusWriterMessage.Completed) == []
    assert all(d.written < 200 * B for d in dests)


def test_cancel_while_the_reader_is_blocked() -> None:
    buckets = 2
    source = Stream(data(40 * B))
    slow = Blocking(after=0)
    fast = [Sink(), Sink()]
    rec = Recorder()
    deadline = Deadline()
    deadline.on_cancel.append(slow.release.set)  # a slow drive's write returns eventually

    def on_message(m: Any) -> None:
        if all(f.written == buckets * B for f in fast) and source.pos == buckets * B:
            deadline.set()

    rec.hooks.append(on_message)
    with pytest.raises(Cancelled):
        BusWriter(source, [*fast, slow], rec, deadline).bucket_size(B).buckets(buckets).write()
    assert deadline.first_true is not None
    assert time.monotonic() - deadline.first_true < 1.0
    assert rec.of(BusWriterMessage.Completed) == []
    assert source.pos <= (buckets + 1) * B


def test_cancel_with_a_destination_stuck_in_write() -> None:
    """A write that never returns is abandoned after a grace period; write() still raises."""
    stuck = Blocking(after=0)
    rec = Recorder()
    deadline = Deadline()
    rec.hooks.append(lambda m: deadline.set())
    stuck_entered = threading.Thread(target=lambda: stuck.entered.wait(5) and deadline.set(),
                                     name="test-helper")
    stuck_entered.start()
    try:
        with pytest.raises(Cancelled):
            BusWriter(Stream(data(10 * B)), [stuck, Sink()], rec, deadline).bucket_size(
                B).write()
        assert deadline.first_true is not None
        assert time.monotonic() - deadline.first_true < CANCEL_GRACE + 0.5
        assert rec.of(BusWriterMessage.Completed, 0) == []
    finally:
        stuck.release.set()
        stuck_entered.join()
    assert_no_engine_threads()
    assert stuck.written <= B  # the abandoned worker stops after its write returns


def test_a_failing_source_raises_its_error() -> None:
    error = OSError(errno.EIO, "bad sector in the image")
    source = Stream(data(10 * B), fail_at=5 * B + 7, error=error)
    dests = [Sink(), Sink()]
    rec = Recorder()
    with pytest.raises(SourceReadFailed) as info:
        BusWriter(source, dests, rec, Deadline()).bucket_size(B).write()
    assert info.value.__cause__ is error  # where it failed, then the source's own error
    assert info.value.strerror == ("reading the image failed in its bytes 327680-393215: bad "
                                   "sector in the image")
    assert rec.of(BusWriterMessage.Completed) == []
    assert rec.of(BusWriterMessage.Errored) == []


def test_a_callback_that_raises_stops_the_run() -> None:
    class Boom(Exception):
        pass

    def callback(m: Any) -> None:
        raise Boom

    source = Stream(data(100 * B))
    with pytest.raises(Boom):
        BusWriter(source, [Sink(), Sink()], callback, Deadline()).bucket_size(B).buckets(
            2).write()
    assert_no_engine_threads()
    assert source.pos < 100 * B


# --------------------------------------------------------------------------------------------
# Verification.


def write_files(tmp_path: Path, payload: bytes, count: int) -> list[Any]:
    dests = files(tmp_path, count)
    writer = BusWriter(io.BytesIO(payload), dests, Recorder(), Deadline()).bucket_size(B)
    writer.write()
    return dests


def check_reads(rec: Recorder, id: int, size: int, complete: bool) -> None:
    """Read counts are cumulative: strictly increasing (never double-counted), within size."""
    counts = rec.read(id)
    assert counts == sorted(set(counts)) and max(counts, default=0) <= size, counts
    if complete:
        assert (counts[-1] if counts else 0) == size


def test_verify_finds_one_corrupt_byte_at_its_offset(tmp_path: Path) -> None:
    payload = data(9 * B + 321)
    dests = write_files(tmp_path, payload, 3)
    bad = 4 * B + 1234
    dests[1].seek(bad)
    dests[1].write(bytes([payload[bad] ^ 0x40]))
    dests[1].flush()
    rec = Recorder()
    verdicts = BusVerifier(io.BytesIO(payload), dests, rec, Deadline()).bucket_size(
        B).verify()
    assert verdicts == [True, False, True]
    assert rec.of(BusVerifierMessage.Invalid) == [BusVerifierMessage.Invalid(1, bad)]
    assert sorted(m.id for m in rec.of(BusVerifierMessage.Valid)) == [0, 2]
    for i in range(3):
        check_reads(rec, i, len(payload), complete=i != 1)
    assert rec.threads == {threading.get_ident()}
    for d in dests:
        d.close()


def test_verify_a_short_destination(tmp_path: Path) -> None:
    payload = data(5 * B + 99)
    dests = write_files(tmp_path, payload, 2)
    end = 3 * B + 17
    dests[0].truncate(end)
    rec = Recorder()
    verdicts = BusVerifier(io.BytesIO(payload), dests, rec, Deadline()).bucket_size(
        B).verify()
    assert verdicts == [False, True]
    assert rec.of(BusVerifierMessage.Invalid) == [BusVerifierMessage.Invalid(0, end)]
    check_reads(rec, 0, end, complete=True)
    for d in dests:
        d.close()


def test_verify_with_digests_reports_the_bad_bucket(tmp_path: Path) -> None:
    payload = data(6 * B + 1000)
    dests = files(tmp_path, 3)
    result = BusWriter(Stream(payload), dests, Recorder(), Deadline()).bucket_size(
        B).record_digests().write()
    assert len(result.digests) == 7 and result.size == len(payload)
    bad = 6 * B + 999  # in the last, short bucket
    dests[2].seek(bad)
    dests[2].write(b"\0" if payload[bad] else b"\1")
    short = 2 * B + 5
    dests[0].truncate(short)
    rec = Recorder()
    verdicts = BusVerifier(None, dests, rec, Deadline()).with_digests(
        result.digests, result.bucket_size, result.size).verify()
    assert verdicts == [False, True, False]
    assert sorted(rec.of(BusVerifierMessage.Invalid), key=lambda m: m.id) == [
        BusVerifierMessage.Invalid(0, short),
        BusVerifierMessage.Invalid(2, 6 * B, len(payload)),
    ]
    check_reads(rec, 1, len(payload), complete=True)
    check_reads(rec, 0, short, complete=True)
    check_reads(rec, 2, len(payload), complete=True)
    for d in dests:
        d.close()


class SlowReader:
    """A destination read back slowly: each read waits for ``release`` (after ``free`` reads),
    calling ``on_block`` first: the moment it is stuck."""

    def __init__(self, f: Any, free: int, on_block: Callable[[], object] = lambda: None
                 ) -> None:
        self.f = f
        self.free = free
        self.on_block = on_block
        self.release = threading.Event()

    def seek(self, offset: int) -> int:
        return self.f.seek(offset)

    def readinto(self, view: Any) -> int:
        if self.free:
            self.free -= 1
        else:
            self.on_block()
            self.release.wait()
        return self.f.readinto(view)


@pytest.mark.parametrize("digests", [False, True])
def test_cancel_during_verify(tmp_path: Path, digests: bool) -> None:
    payload = data(60 * B)
    dests = files(tmp_path, 3)
    result = BusWriter(io.BytesIO(payload), dests, Recorder(), Deadline()).bucket_size(
        B).record_digests().write()
    rec = Recorder()
    deadline = Deadline()
    # Cancelled as destination 2's read-back gets stuck after a few reads.  (A hook on its
    # Read messages reaching 3 buckets never fired: its 3 free reads are smaller than a
    # bucket, so the run waited for HANG, 20 s, to be cancelled.)
    slow = SlowReader(dests[2], free=3, on_block=deadline.set)
    deadline.on_cancel.append(slow.release.set)
    verifier = BusVerifier(io.BytesIO(payload), [*dests[:2], slow], rec, deadline).bucket_size(
        B).buckets(2)
    if digests:
        verifier.with_digests(result.digests, result.bucket_size, result.size)
    with pytest.raises(Cancelled):
        verifier.verify()
    assert deadline.first_true is not None
    assert time.monotonic() - deadline.first_true < 1.0
    assert rec.of(BusVerifierMessage.Invalid) == []
    assert rec.of(BusVerifierMessage.Valid, 2) == []
    for valid in rec.of(BusVerifierMessage.Valid):  # only a destination read to its end
        assert rec.read(valid.id)[-1] == len(payload)
    for d in dests:
        d.close()


def test_a_source_failing_during_verify(tmp_path: Path) -> None:
    payload = data(8 * B)
    dests = write_files(tmp_path, payload, 2)
    error = OSError(errno.EIO, "the image went away")
    with pytest.raises(SourceReadFailed) as info:
        BusVerifier(Stream(payload, fail_at=3 * B, error=error), dests, Recorder(),
                    Deadline()).bucket_size(B).verify()
    assert info.value.__cause__ is error and info.value.errno == errno.EIO
    assert info.value.strerror == ("reading the image failed in its bytes 196608-262143: the "
                                   "image went away")
    for d in dests:
        d.close()


# --------------------------------------------------------------------------------------------
# first_bucket_last.


def test_first_bucket_last_holds_back_the_first_bucket(tmp_path: Path) -> None:
    payload = data(HEAD + 5 * B + 3)  # the head (1 MiB: no partition table), over 16 buckets
    dests = files(tmp_path, 2)
    rec = Recorder()
    result = BusWriter(Stream(payload), dests, rec, Deadline()).bucket_size(
        B).first_bucket_last().write()
    assert result.held is not None and bytes(result.held) == payload[:HEAD]
    for i, d in enumerate(dests):
        got = contents(d)
        assert got[:HEAD] == bytes(HEAD)  # not written
        assert got[HEAD:] == payload[HEAD:]
        check_written(rec, i, len(payload) - HEAD)
        d.seek(0)
        d.write(result.held)
        assert contents(d) == payload
        d.close()


def test_first_bucket_last_needs_seekable_destinations() -> None:
    class Pipe:
        def write(self, view: Any) -> int:
            return len(view)

    with pytest.raises(ValueError, match="seekable"):
        BusWriter(Stream(b"x"), [Pipe()], Recorder(), Deadline()).first_bucket_last().write()


# --------------------------------------------------------------------------------------------
# The seed's example, translated to Python, as written.


def seed_example(directory: Path) -> int:
    payload = bytes([0, 1]) * (25 * 1024 * 1024)  # 50 MiB of alternating 0s and 1s
    source = io.BytesIO(payload)
    names = ["a", "b", "c", "d", "e", "f", "g", "h"]
    temp_files = [tempfile.TemporaryFile(dir=directory) for _ in names]  # noqa: SIM115
    errored = False

    def on_write(event: Any) -> None:
        nonlocal errored
        match event:
            case BusWriterMessage.Written(id=id, bytes_written=bytes_written):
                print(f"{names[id]}: {bytes_written} total bytes written")
            case BusWriterMessage.Completed(id=id):
                print(f"{names[id]}: Completed")
            case BusWriterMessage.Errored(id=id, why=why):
                print(f"{names[id]} errored: {why}")
                errored = True

    try:
        BusWriter(source, temp_files, on_write, lambda: False).write()
    except Exception as why:
        print(f"writing failed: {why}")
        return 1
    if errored:
        print("an error occurred")
        return 1
    print("finished writing; validating files")

    def on_verify(event: Any) -> None:
        nonlocal errored
        match event:
            case BusVerifierMessage.Read(id=id, bytes_read=bytes_read):
                print(f"{names[id]}: {bytes_read} bytes verified")
            case BusVerifierMessage.Valid(id=id):
                print(f"{names[id]}: Validated")
            case BusVerifierMessage.Invalid(id=id, offset=offset):
                print(f"{names[id]}: Invalid at {offset}")
                errored = True
            case BusVerifierMessage.Errored(id=id, why=why):
                print(f"{names[id]} errored while verifying: {why}")
                errored = True

    try:
        BusVerifier(source, temp_files, on_verify, lambda: False).verify()
    except Exception as why:
        print(f"verifying failed: {why}")
        return 1
    if errored:
        print("Error occurred")
        return 1
    print("All files validated!")
    for f in temp_files:
        f.close()
    return 0


def test_the_seed_example_runs_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as directory:  # tmpfs: fsync is free
        assert seed_example(Path(directory)) == 0
    lines = capsys.readouterr().out.splitlines()
    size = 50 << 20
    for name in "abcdefgh":
        mine = [ln for ln in lines if ln.startswith(f"{name}:")]
        assert mine.count(f"{name}: Completed") == 1
        assert f"{name}: {size} total bytes written" in mine
        assert f"{name}: {size} bytes verified" in mine
        assert mine[-1] == f"{name}: Validated"
    assert lines[-1] == "All files validated!"


# --------------------------------------------------------------------------------------------
# Property: any size, bucket size and bucket count round-trips exactly.


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bucket=st.integers(1, 48 << 10),
    buckets=st.integers(1, 5),
    count=st.integers(1, 4),
    fraction=st.floats(0, 1),
    seed=st.integers(0, 2**32),
    kind=st.sampled_from(["stream", "bytesio", "file"]),
    hold=st.booleans(),
)
def test_round_trip_property(bucket: int, buckets: int, count: int, fraction: float, seed: int,
                             kind: str, hold: bool) -> None:
    size = int(fraction * min(bucket * 30, 200 << 10))
    payload = data(size, seed)
    if kind == "file":  # seekable with a fileno: laggards may leave the ring and go solo
        with tempfile.TemporaryFile(dir="/dev/shm") as source:
            source.write(payload)
            source.seek(0)
            round_trip(source, payload, bucket, buckets, count, hold)
    else:
        stream = Stream(payload) if kind == "stream" else io.BytesIO(payload)
        round_trip(stream, payload, bucket, buckets, count, hold)


@pytest.mark.parametrize("ranges", [[(32 << 10, 4096, ""), (0, 512, "")],
                                    [(0, 8192, ""), (4096, 4096, "")], [(0, 0, "")]])
def test_extents_out_of_order_or_overlapping_are_refused(ranges: list[tuple[int, int, str]]
                                                          ) -> None:
    # The head is held by offset, and reads go in order: other ranges would miss bytes.
    with pytest.raises(ValueError, match="must be in order, not overlapping, and not empty"):
        BusWriter(io.BytesIO(bytes(64 << 10)), [io.BytesIO()], Recorder(),
                  Deadline()).only_extents(ranges)


def round_trip(source: Any, payload: bytes, bucket: int, buckets: int, count: int,
               hold: bool) -> None:
    size = len(payload)
    dests = [io.BytesIO() for _ in range(count)]
    rec = Recorder()
    result = BusWriter(source, dests, rec, Deadline()).bucket_size(bucket).buckets(
        buckets).record_digests().first_bucket_last(hold).write()
    assert result.size == size
    held = min(HEAD, size) if hold else 0  # the first MiB (no partition table), over buckets
    assert (result.held is not None) == hold
    for i, d in enumerate(dests):
        if hold:
            assert result.held is not None and bytes(result.held) == payload[:held]
            assert d.getvalue() == (bytes(held) + payload[held:] if size > held else b"")
            d.seek(0)
            d.write(result.held)
        assert d.getvalue() == payload
        check_written(rec, i, size - held)
    vrec = Recorder()
    assert BusVerifier(None, dests, vrec, Deadline()).with_digests(
        result.digests, result.bucket_size, result.size,
        extents=result.extents).verify() == [True] * count
    assert BusVerifier(io.BytesIO(payload), dests, vrec, Deadline()).bucket_size(
        bucket).buckets(buckets).verify() == [True] * count
