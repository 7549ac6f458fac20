"""A flash from start to end: open the checked targets, write, verify, write the first bucket last.

This is the edge between the engine (which knows file objects and messages) and the views
(which know events).  It owns every drive's state and turns each engine message into an event;
it never decides whether a drive may be written (that is :mod:`popsicle_py.plan`'s job).

Order of work for each drive, so that a drive that fails or is interrupted never holds a
complete-looking image: write everything but the first bucket (the engine keeps it in memory),
verify that from the device, then write the first bucket, flush, and verify it too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from popsicle_py import blockdev
from popsicle_py.blockdev import BlockDevice, OpenSpec
from popsicle_py.bmap import Bmap
from popsicle_py.buffers import aligned_buffer
from popsicle_py.engine import (
    CANCEL_GRACE,
    CHUNK,
    DEFAULT_BUCKET_SIZE,
    DEFAULT_BUCKETS,
    POLL,
    AllDestinationsFailed,
    BusVerifier,
    BusWriter,
    Cancelled,
    WriteResult,
    first_difference,
    keep_signals_for_main_thread,
    read_full,
    sync,
    write_all,
)
from popsicle_py.events import (
    DriveInfo,
    DriveResult,
    Event,
    Note,
    Phase,
    Progress,
    Result,
    Started,
    Summary,
)
from popsicle_py.messages import BusVerifierMessage, BusWriterMessage

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]
CancelCheck = Callable[[], bool]


class DriveLike(Protocol):
    """What the job needs of a drive (a :class:`popsicle_py.drives.Drive` has it all)."""

    path: str
    size: int
    logical_block_size: int


class ImageLike(Protocol):
    path: str
    format: str
    size: int | None

    def open(self) -> Any: ...

    @property
    def seekable_raw(self) -> bool: ...


class OpenError(Exception):
    """Some targets could not be opened; nothing was written.  One line per target."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


@dataclass(frozen=True)
class FlashOptions:
    verify: bool = True
    bucket_size: int = DEFAULT_BUCKET_SIZE
    buckets: int = DEFAULT_BUCKETS
    stall_timeout: float | None = 60.0
    skip_identical: bool = False
    repair_attempts: int = 1
    bmap: Bmap | None = None


def open_targets(drives: Sequence[DriveLike], *, for_writing: bool = True,
                 check: Callable[[Any], str | None] | None = None) -> list[BlockDevice]:
    """Open every drive, or none: a drive that cannot be opened stops the run before writing.

    ``check(drive)`` may refuse a drive that changed since it was selected.
    """
    opened: list[BlockDevice] = []
    problems: list[str] = []
    for drive in drives:
        if check is not None:
            problem = check(drive)
            if problem:
                problems.append(problem)
                continue
        spec = OpenSpec(drive.path, drive.size, getattr(drive, "logical_block_size", 512))
        try:
            opener = blockdev.open_for_writing if for_writing else blockdev.open_for_reading
            opened.append(opener(spec))
        except OSError as exc:
            problems.append(blockdev.describe_error(exc, drive.path))
    if problems:
        for device in opened:
            device.close()
        raise OpenError(problems)
    return opened


class _Drive:
    """The job's record of one drive."""

    def __init__(self, device: BlockDevice, info: DriveInfo | None = None) -> None:
        self.device = device
        self.info = info
        self.path = device.path
        self.written = 0
        self.status: str | None = None  # final status once known
        self.error: str | None = None
        self.mismatch: int | None = None
        self.ended: float | None = None
        self.skipped = 0
        self.repaired = 0
        self.last_progress = time.monotonic()
        #: Set when the drive ends while its own thread may still run (stalled, cancelled):
        #: that thread stops at its next chunk and never writes again.
        self.stop = threading.Event()

    @property
    def live(self) -> bool:
        return self.status is None


class _Job:
    """State and reporting shared by flashing and verifying: every drive ends exactly once.

    Drives may finish on threads of their own, so state changes and events are serialized by
    one lock: the views see one event at a time, in order.
    """

    #: An ok drive was read back and matched (False for a flash with --no-verify).
    verifies = True

    def __init__(self, devices: Sequence[BlockDevice], emit: Emit, cancel: CancelCheck,
                 infos: Sequence[DriveInfo] = ()) -> None:
        self._emit = emit
        self._lock = threading.RLock()
        self.cancel = cancel
        self.infos = tuple(infos)
        self.drives = [_Drive(d, self.infos[i] if i < len(self.infos) else None)
                       for i, d in enumerate(devices)]
        self.started = time.monotonic()
        self.cancelled = False
        self._closed = False

    def emit(self, event: Event) -> None:
        with self._lock:
            if self._closed:
                return  # the summary is the last event, whatever an abandoned thread says
            device = getattr(event, "device", None)
            for drive in self.drives:
                if drive.path == device:
                    drive.last_progress = time.monotonic()
            self._emit(event)

    def _phase(self, drive: _Drive, phase: str, detail: str | None = None) -> None:
        self.emit(Phase(drive.path, phase, detail))

    def _end(self, drive: _Drive, status: str, error: str | None = None,
             mismatch: int | None = None) -> None:
        with self._lock:
            if not drive.live:
                return
            drive.status, drive.error, drive.mismatch = status, error, mismatch
            drive.ended = time.monotonic()
            drive.stop.set()
            self._phase(drive, "done" if status == "ok" else "failed", error or status)
            self.emit(Result(self._result(drive)))

    def _result(self, drive: _Drive) -> DriveResult:
        elapsed = None if drive.ended is None else drive.ended - self.started
        return DriveResult(drive.path, drive.status or "cancelled", drive.written, drive.error,
                           drive.mismatch, elapsed, drive.skipped, drive.repaired,
                           verified=drive.status == "ok" and self.verifies, drive=drive.info)

    def _fail(self, drive: _Drive, exc: BaseException) -> None:
        self._end(drive, "failed", blockdev.describe_error(exc, drive.path))

    def _cancel_rest(self) -> None:
        self.cancelled = True
        for drive in self.drives:
            self._end(drive, "cancelled", "cancelled")

    def _live(self) -> list[_Drive]:
        return [d for d in self.drives if d.live]

    def _summary(self) -> Summary:
        with self._lock:
            summary = Summary(tuple(self._result(d) for d in self.drives), self.cancelled)
            self.emit(summary)
            self._closed = True
        return summary


class FlashJob(_Job):
    """Write one image to many opened drives, then verify each from the device.

    Each drive goes on as soon as its own write is done: verification of everything but the
    first bucket, then the first bucket, then its verification.  A fast drive is therefore
    finished (and can be pulled) while a slow one is still being written.
    """

    def __init__(self, image: ImageLike, devices: Sequence[BlockDevice], options: FlashOptions,
                 emit: Emit, cancel: CancelCheck, infos: Sequence[DriveInfo] = ()) -> None:
        super().__init__(devices, emit, cancel, infos)
        self.image = image
        self.options = options
        self.verifies = options.verify
        self._finishers: list[tuple[threading.Thread, _Drive]] = []

    def run(self) -> Summary:
        try:
            self._run()
        except Cancelled:
            self._cancel_rest()
        except Exception as exc:  # a bug of ours: every unfinished drive says so, none is ok
            log.debug("flash stopped by an unexpected error", exc_info=True)
            for drive in self._live():
                self._end(drive, "failed", f"{drive.path}: internal error: {exc}")
        finally:
            self._join_finishers()
            for drive in self.drives:
                with contextlib.suppress(OSError):
                    drive.device.close()
            for drive in self.drives:
                if drive.status == "ok":  # its threads all ended: the descriptor is free
                    drive.device.release()
                    blockdev.reread_partitions(drive.path)
        return self._summary()

    def _run(self) -> None:
        self.emit(Started(self.image.path, self.image.format, self.image.size,
                          tuple(d.path for d in self.drives), verify=self.options.verify,
                          drives=self.infos))
        self._write()
        self._join_finishers()
        if self.cancel():
            raise Cancelled("cancelled")

    def _join_finishers(self) -> None:
        """Wait for every drive's own finish, but not for one that hangs.

        Short waits, so that signal handlers keep running.  A drive whose finish makes no
        progress for the stall timeout fails as stalled; after a cancel, a drive still busy
        after the grace ends cancelled.  Either way its thread is left behind, stopped at its
        next chunk (``drive.stop``), and the run goes on to its summary.
        """
        stall = self.options.stall_timeout
        cancelled_at: float | None = None
        while True:
            busy = [(t, d) for t, d in self._finishers if t.is_alive() and d.live]
            if not busy:
                return
            now = time.monotonic()
            if self.cancel():
                cancelled_at = cancelled_at or now
                if now - cancelled_at > CANCEL_GRACE:
                    for _, drive in busy:
                        self._end(drive, "cancelled", "cancelled")
                    return
            for _, drive in busy:
                if cancelled_at is None and stall is not None \
                        and now - drive.last_progress > stall:
                    self._end(drive, "failed", f"{drive.path}: stalled: no progress for "
                              f"{stall:g} s")
            busy[0][0].join(POLL)

    @property
    def total(self) -> int | None:
        """Bytes each drive gets: the mapped ones only, with a block map."""
        bmap = self.options.bmap
        return bmap.mapped if bmap is not None else self.image.size

    def _write(self) -> None:
        total = self.total
        writer: BusWriter | None = None

        def on_message(msg: Any) -> None:
            drive = self.drives[msg.id]
            match msg:
                case BusWriterMessage.Written(bytes_written=n):
                    drive.written = n
                    self.emit(Progress(drive.path, "writing", n + drive.skipped, total))
                case BusWriterMessage.Skipped(bytes_skipped=n):
                    drive.skipped = n
                    self.emit(Progress(drive.path, "writing", drive.written + n, total))
                case BusWriterMessage.Errored(why=why):
                    self._fail(drive, why)
                case BusWriterMessage.Completed():
                    assert writer is not None
                    self._start_finisher(drive, writer.source_read())

        for drive in self.drives:
            self._phase(drive, "writing")
        source = None
        try:
            source = self.image.open()
            writer = (
                BusWriter(source, [d.device for d in self.drives], on_message, self.cancel)
                .bucket_size(self.options.bucket_size)
                .buckets(self.options.buckets)
                .stall_timeout(self.options.stall_timeout)
                .record_digests()
                .first_bucket_last()
                .skip_identical(self.options.skip_identical)
            )
            bmap = self.options.bmap
            if bmap is None:
                writer.expect_size(self.image.size)
            else:
                writer.only_extents([(e.offset, e.length, e.checksum) for e in bmap.extents],
                                    bmap.algo)
            writer.write()
        except (Cancelled, KeyboardInterrupt):
            raise Cancelled from None
        except AllDestinationsFailed:
            return
        except Exception as exc:  # the image could not be read: no drive holds it
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            for drive in self._live():
                self._end(drive, "failed", f"{drive.path}: {why}")
        finally:
            if source is not None:
                with contextlib.suppress(Exception):
                    source.close()

    def _start_finisher(self, drive: _Drive, source: WriteResult) -> None:
        thread = threading.Thread(target=self._finish, args=(drive, source), daemon=True,
                                  name=f"popsicle-finish-{drive.path}")
        self._finishers.append((thread, drive))
        thread.start()

    def _finish(self, drive: _Drive, source: WriteResult) -> None:
        """One drive after its write: verify the rest, write the first bucket, verify it."""
        keep_signals_for_main_thread()
        rest = range(1, len(source.digests))
        try:
            if self.options.verify and not self._check(drive, source, rest):
                return
            if drive.live:
                self._write_first_bucket(drive, source)
            if drive.live and self.options.verify and source.digests \
                    and not self._check(drive, source, [0]):
                return
            self._end(drive, "ok")
        except Cancelled:
            self._end(drive, "cancelled", "cancelled")
        except Exception as exc:
            self._fail(drive, exc)

    def _check(self, drive: _Drive, source: WriteResult, indices: Sequence[int]) -> bool:
        """Verify these buckets; rewrite bad ones up to ``repair_attempts`` times.

        Ends the drive as invalid (with the first bad byte) when it still differs.
        """
        repairs = self.options.repair_attempts
        bad = self._verify(drive, source, indices, report_all=repairs > 0)
        repaired: set[int] = set(bad)
        attempts = 0
        while bad and drive.live and attempts < repairs:
            attempts += 1
            self._rewrite(drive, source, bad)
            bad = self._verify(drive, source, bad, report_all=True)
        if not drive.live:
            return False
        if bad:
            start, length = source.extents[bad[0]]
            exact = self._exact_offset(drive, start, start + length)
            where = (f"at byte {exact}" if exact is not None
                     else f"somewhere in bytes {start}-{start + length - 1}")
            tried = f" (still after {attempts} repair attempts)" if attempts else ""
            self._end(drive, "invalid", f"{drive.path}: verification failed: the drive "
                      f"differs from the image {where}{tried}", start if exact is None else exact)
            return False
        if attempts:
            drive.repaired += len(repaired)
            self.emit(Note(f"{drive.path}: repaired {len(repaired)} bucket(s)"))
        return True

    def _verify(self, drive: _Drive, source: WriteResult, indices: Sequence[int], *,
                report_all: bool) -> list[int]:
        """Read these buckets back from the device; the indices of the bad ones."""
        if not indices or not drive.live:
            return []
        blockdev.drop_cache(drive.device)
        self._phase(drive, "verifying")
        span = sum(source.extents[i][1] for i in indices)
        by_offset = {source.extents[i][0]: i for i in indices}
        bad: list[int] = []

        def on_message(msg: Any) -> None:
            match msg:
                case BusVerifierMessage.Read(bytes_read=n):
                    self.emit(Progress(drive.path, "verifying", n, span))
                case BusVerifierMessage.Invalid(offset=offset, end=None):
                    self._end(drive, "invalid", f"{drive.path}: verification failed: the drive "
                              f"ends at byte {offset}, before the image does", offset)
                case BusVerifierMessage.Invalid(offset=offset):
                    bad.append(by_offset[offset])
                case BusVerifierMessage.Errored(why=why):
                    self._fail(drive, why)

        verifier = BusVerifier(None, [drive.device], on_message, self.cancel)
        verifier.with_digests(source.digests, source.bucket_size, source.size,
                              extents=source.extents, only=indices, report_all=report_all)
        verifier.stall_timeout(self.options.stall_timeout).verify()
        return sorted(bad)

    def _rewrite(self, drive: _Drive, source: WriteResult, indices: Sequence[int]) -> None:
        """Write these buckets again from the image (the held first bucket from memory)."""
        self._phase(drive, "writing", "repairing")
        for index in indices:
            if self.cancel():
                raise Cancelled("cancelled")
            offset, length = source.extents[index]
            if index == 0 and source.held is not None:
                data = source.held
            else:
                data = memoryview(self._image_bytes(offset, length))
            drive.device.seek(offset)
            self._write_chunks(drive, data)
            drive.written += length
        sync(drive.device)

    def _image_bytes(self, offset: int, length: int) -> bytes:
        """Bytes of the image: by position for a raw image, else decompressed up to them."""
        if self.image.seekable_raw:
            with open(self.image.path, "rb", buffering=0) as f:
                return os.pread(f.fileno(), length, offset)
        stream = self.image.open()
        try:
            scratch = memoryview(bytearray(min(CHUNK, max(offset, 1))))
            done = 0
            while done < offset:
                got = stream.readinto(scratch[: min(len(scratch), offset - done)])
                if not got:
                    break
                done += got
            out = bytearray(length)
            got = read_full(stream, memoryview(out))
            return bytes(out[:got])
        finally:
            stream.close()

    def _exact_offset(self, drive: _Drive, offset: int, end: int | None) -> int | None:
        """Narrow a bad bucket to its first bad byte when the image can be read by position.

        None when it cannot be narrowed (a compressed image is not read a second time).
        """
        if end is None:
            return offset
        if not self.image.seekable_raw:
            return None
        try:
            with open(self.image.path, "rb", buffering=0) as f:
                want = memoryview(os.pread(f.fileno(), end - offset, offset))
            buf = memoryview(aligned_buffer(len(want)))[: len(want)]
            drive.device.seek(offset)
            got = read_full(drive.device, buf)
            diff = first_difference(want[:got], buf[:got])
            if diff >= 0:
                return offset + diff
            return offset + got if got < len(want) else None
        except OSError:
            return None

    def _write_first_bucket(self, drive: _Drive, source: WriteResult) -> None:
        held = source.held
        if held is None or len(held) == 0:
            return
        self._phase(drive, "syncing")
        offset = source.held_offset
        for start in range(0, len(held), CHUNK):
            if self.cancel():
                raise Cancelled("cancelled")
            piece = held[start : start + CHUNK]
            if self.options.skip_identical and self._holds(drive, piece, offset + start):
                drive.skipped += len(piece)
                continue
            drive.device.seek(offset + start)
            self._write_chunks(drive, piece)
            drive.written += len(piece)
            self.emit(Progress(drive.path, "writing", drive.written + drive.skipped, self.total))
        sync(drive.device)
        self.emit(Progress(drive.path, "writing", drive.written + drive.skipped, self.total))

    def _write_chunks(self, drive: _Drive, data: memoryview) -> None:
        """Write from a drive's own thread: stop at the next chunk once the drive has ended."""
        for start in range(0, len(data), CHUNK):
            if drive.stop.is_set() or self.cancel():
                raise Cancelled("cancelled")
            write_all(drive.device, data[start : start + CHUNK], stop=drive.stop)
            drive.last_progress = time.monotonic()
        if drive.stop.is_set():
            raise Cancelled("cancelled")

    def _holds(self, drive: _Drive, piece: memoryview, offset: int) -> bool:
        mine = memoryview(aligned_buffer(len(piece)))[: len(piece)]
        drive.device.seek(offset)
        return read_full(drive.device, mine) == len(piece) and bytes(mine) == bytes(piece)


class VerifyJob(_Job):
    """Compare drives with an image, reading the image once for all of them."""

    def __init__(self, image: ImageLike, devices: Sequence[BlockDevice], emit: Emit,
                 cancel: CancelCheck, infos: Sequence[DriveInfo] = ()) -> None:
        super().__init__(devices, emit, cancel, infos)
        self.image = image

    def run(self) -> Summary:
        size = self.image.size
        self.emit(Started(self.image.path, self.image.format, size,
                          tuple(d.path for d in self.drives), drives=self.infos))
        drives = self.drives

        def on_message(msg: Any) -> None:
            drive = drives[msg.id]
            match msg:
                case BusVerifierMessage.Read(bytes_read=n):
                    self.emit(Progress(drive.path, "verifying", n, size))
                case BusVerifierMessage.Valid():
                    self._end(drive, "ok")
                case BusVerifierMessage.Invalid(offset=offset):
                    self._end(drive, "invalid", f"{drive.path}: differs from the image at byte "
                              f"{offset}", offset)
                case BusVerifierMessage.Errored(why=why):
                    self._fail(drive, why)

        for drive in drives:
            self._phase(drive, "verifying")
        source = None
        try:
            source = self.image.open()
            BusVerifier(source, [d.device for d in drives], on_message, self.cancel).verify()
        except Cancelled:
            self._cancel_rest()
        except Exception as exc:
            for drive in self._live():
                self._end(drive, "failed", f"{drive.path}: {exc}")
        finally:
            if source is not None:
                with contextlib.suppress(Exception):
                    source.close()
            for drive in drives:
                drive.device.close()
        return self._summary()
