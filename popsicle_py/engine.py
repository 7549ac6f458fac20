"""The broadcast engine: read a source once, write it to many destinations in parallel.

One reader thread fills a bounded ring of page-aligned buckets; one worker thread per
destination writes the very same buckets (memoryviews, never copies).  The reader waits while
the slowest worker still in the ring holds the oldest bucket, so memory stays at about
``(buckets + 1) x bucket size`` whatever the source size.  Every message reaches the caller's
callback on the calling thread, which also polls ``cancel()`` and watches for stalled drives.

Laggards: when a destination falls a full ring behind while another one waits for data, and
the source is a seekable file (it has a ``fileno()`` of a regular file or block device), that
destination leaves the ring and goes on alone with positional reads (``os.preadv``) into one
small buffer of its own; the page cache serves those reads for images that fit in memory, so
the source is still read from disk once.  It leaves at once, even while blocked inside a write:
the bucket it is writing from stays its own until that write returns, and the ring takes a
fresh bucket in its place.  A stream (a decompressor, a pipe) cannot be re-read, so its
destinations stay in lock-step with the slowest one: memory stays bounded either way.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import queue
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import xxhash

from popsicle_py.buffers import aligned_buffer, is_aligned
from popsicle_py.messages import BusVerifierMessage, BusWriterMessage

DEFAULT_BUCKET_SIZE = 16 << 20
DEFAULT_BUCKETS = 4
#: No single read or write is larger than this, so a cancel or a stall is seen within one
#: chunk's time even on a slow drive (4 MiB at 4 MB/s is one second).
CHUNK = 4 << 20
#: How often the calling thread wakes to poll ``cancel()`` when nothing else happens.
POLL = 0.1
#: How long a drive may hold back the others before it is sent on alone (see laggards).
LAGGARD_PATIENCE = 0.25
#: How long a cancelled run waits for workers to leave a system call before abandoning them.
CANCEL_GRACE = 1.5
#: Write errors worth another try: busy hubs and flaky sticks produce them and then recover.
TRANSIENT = frozenset({errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.EBUSY})
DEFAULT_RETRIES = 5
RETRY_BACKOFF = 0.1

Callback = Callable[[Any], None]
CancelCheck = Callable[[], bool]


class Cancelled(Exception):
    """The run was cancelled; no unfinished destination was reported as completed."""


class AllDestinationsFailed(Exception):
    """Every destination failed; ``results`` says how each one did."""

    def __init__(self, results: Sequence[DestinationResult]) -> None:
        self.results = tuple(results)
        reasons = "; ".join(f"{r.id}: {r.error}" for r in self.results)
        super().__init__(f"every destination failed ({reasons})")


class SourceChanged(OSError):
    """The source held more or fewer bytes than it was said to."""

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(errno.EIO, f"the image ended at byte {got} but should hold {expected} "
                         "bytes (was it truncated or changed while being read?)")
        self.expected = expected
        self.got = got


class ExtentChecksumError(OSError):
    """A range of the source does not match the checksum its block map gives."""

    def __init__(self, offset: int, length: int, algo: str) -> None:
        super().__init__(errno.EIO, f"the image does not match its block map: bytes {offset}-"
                         f"{offset + length - 1} fail their {algo} checksum")
        self.offset = offset
        self.length = length


@dataclass(frozen=True)
class DestinationResult:
    """How one destination did: bytes written and the error that ended it, if any."""

    id: int
    bytes_written: int
    error: OSError | None = None
    bytes_skipped: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class WriteResult(Sequence[DestinationResult]):
    """Per-destination results, plus what verification without the source needs.

    ``digests`` holds an XXH3-128 digest per bucket of the source (when recording was asked
    for); ``held`` is the first bucket, kept back by :meth:`BusWriter.first_bucket_last`.
    """

    results: tuple[DestinationResult, ...]
    size: int
    bucket_size: int
    digests: tuple[bytes, ...] = ()
    held: memoryview | None = field(default=None, repr=False)
    #: (offset, length) of each digest's bytes; the held bucket is the first.
    extents: tuple[tuple[int, int], ...] = ()

    @property
    def held_offset(self) -> int:
        return self.extents[0][0] if self.extents else 0

    def __getitem__(self, index: int) -> DestinationResult:  # type: ignore[override]
        return self.results[index]

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[DestinationResult]:
        return iter(self.results)


# --------------------------------------------------------------------------------------------
# Small I/O helpers shared by the writer, the verifier and callers (the CLI's last bucket).


#: Process signals that a worker thread must never take.
_MAIN_THREAD_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})


def keep_signals_for_main_thread() -> None:
    """Block the stop signals in the calling (worker) thread.

    The kernel hands a process signal to any thread that does not block it, and a thread
    stuck in a throttled O_DIRECT write cannot run even the C-level handler until the write
    returns, seconds later: Ctrl-C would wait for the slowest drive.  Blocked here, the
    signal goes to the main thread, which runs Python's handlers anyway.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _MAIN_THREAD_SIGNALS)


def _as_oserror(exc: BaseException) -> OSError:
    """Every destination failure is reported as an OSError, as the API promises."""
    if isinstance(exc, OSError):
        return exc
    wrapped = OSError(errno.EIO, f"{type(exc).__name__}: {exc}")
    wrapped.__cause__ = exc
    return wrapped


def _seek(dest: Any, offset: int) -> None:
    if hasattr(dest, "seek"):
        dest.seek(offset)


def write_all(
    dest: Any,
    view: memoryview,
    *,
    offset: int | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[int], None] | None = None,
    retries: int = DEFAULT_RETRIES,
) -> int:
    """Write all of ``view`` in chunks, completing short writes; a write of 0 is an error.

    Transient errors are retried with a growing pause (seeking back first when ``offset``
    says where the data belongs).  Returns the bytes written; stops early, without error,
    when ``stop`` is set.
    """
    done = 0
    total = len(view)
    attempt = 0
    while done < total:
        if stop is not None and stop.is_set():
            return done
        chunk = view[done : done + CHUNK]
        try:
            if offset is not None and attempt:
                _seek(dest, offset + done)
            n = dest.write(chunk)
        except (io.UnsupportedOperation, ValueError) as exc:
            raise _as_oserror(exc) from exc
        except OSError as exc:
            if exc.errno in TRANSIENT and attempt < retries:
                attempt += 1
                pause = RETRY_BACKOFF * (2 ** (attempt - 1))
                if stop is not None:
                    stop.wait(pause)
                else:
                    time.sleep(pause)
                continue
            raise
        if n is None:  # file-likes that return nothing wrote everything
            n = len(chunk)
        if n <= 0:
            raise OSError(errno.EIO, "the destination accepted 0 bytes (full or gone?)")
        attempt = 0
        done += n
        if progress is not None:
            progress(n)
    return done


def sync(dest: Any) -> None:
    """Flush Python's buffer and the kernel's; EINVAL means the file cannot be synced."""
    flush = getattr(dest, "flush", None)
    if flush is not None:
        flush()
    try:
        fd = dest.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EROFS, errno.ENOTSUP):
            raise


def read_full(source: Any, view: memoryview) -> int:
    """Fill ``view`` from ``source`` until it is full or the source ends."""
    done = 0
    readinto = getattr(source, "readinto", None)
    while done < len(view):
        if readinto is not None:
            n = readinto(view[done:])
        else:
            data = source.read(len(view) - done)
            n = len(data)
            view[done : done + n] = data
        if not n:
            break
        done += n
    return done


def first_difference(a: memoryview, b: memoryview) -> int:
    """Index of the first differing byte of two equal-length views (-1 when equal)."""
    step = 64 << 10
    for start in range(0, len(a), step):
        x, y = bytes(a[start : start + step]), bytes(b[start : start + step])
        if x != y:
            for i, (p, q) in enumerate(zip(x, y, strict=True)):
                if p != q:
                    return start + i
    return -1


def _pread_source(source: Any) -> tuple[int, int] | None:
    """(fd, starting offset) when the source can be re-read by position, else None."""
    try:
        fd = source.fileno()
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            return None
        return fd, source.tell()
    except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# The ring and the machinery the writer and the verifier share.


class _Ring:
    """Bounded ring of buckets: one producer, many consumers, all waits on one condition."""

    def __init__(self, slots: list[memoryview]) -> None:
        self.slots = slots
        self.lengths = [0] * len(slots)
        self.offsets = [0] * len(slots)
        self.cond = threading.Condition()
        self.head = 0  # buckets published so far
        self.eof = False
        self.positions: dict[int, int] = {}  # consumer id -> next bucket it needs
        self.starving: set[int] = set()

    def slot_free(self, seq: int) -> bool:
        oldest = seq - len(self.slots)
        return all(pos > oldest for pos in self.positions.values())


class _Worker:
    """What the calling thread knows of one destination's thread."""

    def __init__(self, index: int, dest: Any) -> None:
        self.id = index
        self.dest = dest
        self.done = 0  # bytes written or read back
        self.finished = False
        self.abandoned = False
        self.waiting = True
        self.last_progress = time.monotonic()
        self.error: OSError | None = None
        self.detach = False
        self.solo = False
        self.skipped = 0  # bytes left alone because the destination held them already
        self.compare: memoryview | None = None
        self.thread: threading.Thread | None = None


@dataclass(frozen=True)
class _Finished:
    id: int


@dataclass(frozen=True)
class _ReaderDone:
    error: BaseException | None


class _Broadcast:
    """The parts of a run that do not depend on the direction of the data."""

    def __init__(
        self,
        source: BinaryIO | Any,
        destinations: Sequence[Any],
        callback: Callback,
        cancel: CancelCheck,
    ) -> None:
        if not destinations:
            raise ValueError("no destinations: give at least one")
        self.source = source
        self.destinations = list(destinations)
        self.callback = callback
        self.cancel = cancel
        self._bucket_size = DEFAULT_BUCKET_SIZE
        self._bucket: Any = None
        self._buckets = DEFAULT_BUCKETS
        self._stall_timeout: float | None = None
        self._retries = DEFAULT_RETRIES
        self._expected_size: int | None = None
        self._extents: tuple[tuple[int, int, str | None], ...] | None = None
        self._lag_since: dict[int, float] = {}  # when each drive began to hold the ring back
        self._extent_algo: str | None = None
        self._source_total: int | None = None

    # Builder methods (the seed's API, chainable).
    def with_bucket(self, buffer: Any) -> Any:
        """Use the caller's buffer as a bucket: its length sets the bucket size.

        A page-aligned writable buffer (an ``mmap``) becomes the ring's first bucket and no
        memory is allocated for it (after ``write()`` it holds a bucket of the source; the ring
        stops using it only if a laggard leaves the ring while writing from it).  Any other
        buffer (a ``bytearray`` is not guaranteed to be aligned) sets only the size, and an
        aligned bucket is allocated in its place, so that O_DIRECT destinations always get
        aligned memory.
        """
        size = len(memoryview(buffer).cast("B"))
        if size <= 0:
            raise ValueError("the bucket buffer is empty")
        self._bucket_size = size
        self._bucket = buffer if is_aligned(buffer) else None
        return self

    def buckets(self, count: int) -> Any:
        """How many buckets may be in flight (at least 1)."""
        if count < 1:
            raise ValueError("buckets must be at least 1")
        self._buckets = count
        return self

    def bucket_size(self, size: int) -> Any:
        """Bucket size in bytes, when no buffer of the caller's is given."""
        if size < 1:
            raise ValueError("bucket size must be at least 1 byte")
        self._bucket_size = size
        self._bucket = None
        return self

    def stall_timeout(self, seconds: float | None) -> Any:
        """Fail a destination that makes no progress for this long (None: never)."""
        self._stall_timeout = seconds
        return self

    def expect_size(self, size: int | None) -> Any:
        """Fail the run if the source does not hold exactly ``size`` bytes.

        A file truncated or replaced while it is being read would otherwise look like a
        shorter image that was written and verified perfectly.
        """
        self._expected_size = size
        return self

    def retries(self, count: int) -> Any:
        """How often a transient write error (EIO, EAGAIN, ETIMEDOUT, EBUSY) is retried."""
        self._retries = max(0, count)
        return self

    # Shared run machinery.
    def _make_slots(self) -> list[memoryview]:
        slots = []
        for i in range(self._buckets):
            if i == 0 and self._bucket is not None:
                slots.append(memoryview(self._bucket).cast("B"))
            else:
                slots.append(memoryview(aligned_buffer(self._bucket_size)))
        return slots

    def _run(self, workers: list[_Worker], targets: list[Callable[[_Worker], None]],
             reader: Callable[[], None] | None) -> BaseException | None:
        """Start the threads, deliver messages until all are done; return the reader's error.

        Raises :class:`Cancelled` once everything that can stop has stopped.
        """
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._workers = workers
        for worker, target in zip(workers, targets, strict=True):
            worker.thread = threading.Thread(
                target=self._guard, args=(worker, target), daemon=True,
                name=f"popsicle-{type(self).__name__}-{worker.id}",
            )
        reader_error: BaseException | None = None
        reader_done = reader is None
        if reader is not None:
            threading.Thread(target=self._read_guard, args=(reader,), daemon=True,
                             name="popsicle-reader").start()
        for worker in workers:
            assert worker.thread is not None
            worker.thread.start()

        cancelled = False
        deadline = 0.0
        try:
            while True:
                if reader_done and all(w.finished or w.abandoned for w in workers):
                    break
                try:
                    msg = self._queue.get(timeout=POLL)
                except queue.Empty:
                    msg = None
                if isinstance(msg, _Finished):
                    workers[msg.id].finished = True
                elif isinstance(msg, _ReaderDone):
                    reader_done = True
                    if msg.error is not None and not cancelled:
                        reader_error = msg.error
                        self._halt()
                elif msg is not None and not workers[msg.id].abandoned:
                    self.callback(msg)
                if not cancelled and self.cancel():
                    cancelled = True
                    deadline = time.monotonic() + CANCEL_GRACE
                    self._halt()
                now = time.monotonic()
                if cancelled and now > deadline:
                    for w in workers:
                        w.abandoned = w.abandoned or not w.finished
                    break
                if not cancelled:
                    self._check_stalls(now)
            self._drain()
        finally:
            # Whatever ends the run (the end, a cancel, an exception from the callback or from
            # cancel()), the threads must not go on: abandoned ones stop when their call returns.
            self._halt()
        if cancelled:
            raise Cancelled("cancelled")
        return reader_error

    def _drain(self) -> None:
        """Deliver what finished workers posted before they finished."""
        while True:
            try:
                msg = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, (_Finished, _ReaderDone)):
                continue
            if not self._workers[msg.id].abandoned:
                self.callback(msg)

    def _halt(self) -> None:
        self._stop.set()
        ring = getattr(self, "_ring", None)
        if ring is not None:
            with ring.cond:
                ring.cond.notify_all()

    def _check_stalls(self, now: float) -> None:
        if self._stall_timeout is None:
            return
        for w in self._workers:
            if w.finished or w.abandoned or w.waiting:
                continue
            if now - w.last_progress > self._stall_timeout:
                w.abandoned = True
                w.error = OSError(
                    errno.ETIMEDOUT, f"stalled: no progress for {self._stall_timeout:g} s"
                )
                self._leave_ring(w)
                self.callback(self._errored(w.id, w.error))

    def _leave_ring(self, worker: _Worker) -> None:
        ring = getattr(self, "_ring", None)
        if ring is not None:
            with ring.cond:
                ring.positions.pop(worker.id, None)
                ring.starving.discard(worker.id)
                ring.cond.notify_all()
                if not ring.positions and not self._has_solo():
                    self._stop.set()

    def _has_solo(self) -> bool:
        return False

    def _errored(self, index: int, why: OSError) -> Any:
        raise NotImplementedError

    def _guard(self, worker: _Worker, target: Callable[[_Worker], None]) -> None:
        keep_signals_for_main_thread()
        try:
            target(worker)
        except Exception as exc:  # every failure of a destination becomes a message
            if not worker.abandoned:
                worker.error = _as_oserror(exc)
                self._leave_ring(worker)
                if not worker.abandoned:
                    self._queue.put(self._errored(worker.id, worker.error))
        finally:
            self._queue.put(_Finished(worker.id))

    def _read_guard(self, reader: Callable[[], None]) -> None:
        keep_signals_for_main_thread()
        try:
            reader()
        except BaseException as exc:  # handed to the calling thread, which raises it
            self._queue.put(_ReaderDone(exc))
        else:
            self._queue.put(_ReaderDone(None))

    def _reads(self) -> Iterator[tuple[int, int, int | None]]:
        """(offset, most bytes, extent index) of each bucket to read, in source order.

        Without extents the source is read to its end in whole buckets; with them, only the
        listed ranges are read, each cut into buckets.
        """
        size = self._bucket_size
        if self._extents is None:
            offset = 0
            while True:
                yield offset, size, None
                offset += size
        for index, (start, length, _) in enumerate(self._extents):
            for piece in range(start, start + length, size):
                yield piece, min(size, start + length - piece), index

    def _position_source(self, offset: int, scratch: memoryview) -> None:
        """Move the source to ``offset``: seek where it can, otherwise read and drop."""
        if offset == self._source_pos:
            return
        try:
            self.source.seek(self._source_base + offset)
            self._source_pos = offset
            return
        except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
            pass
        while self._source_pos < offset:
            got = read_full(self.source, scratch[: min(len(scratch), offset - self._source_pos)])
            if not got:
                raise SourceChanged(offset, self._source_pos)
            self._source_pos += got

    def _reader_loop(self, hold_first: memoryview | None, digests: list[bytes] | None,
                     laggards: bool) -> int:
        """Fill the ring from the source; returns the total size read."""
        ring = self._ring
        seq = 0
        total = 0
        first = hold_first is not None
        extents = self._extents
        checker: Any = None
        self._source_pos = 0
        try:
            self._source_base = self.source.tell() if extents is not None else 0
        except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
            self._source_base = 0
        for offset, limit, index in self._reads():
            if first:
                assert hold_first is not None
                view = hold_first[:limit]
            else:
                with ring.cond:
                    waited = False
                    while not self._stop.is_set() and not ring.slot_free(seq):
                        waited = True
                        if laggards and self._detach_laggards(seq):
                            continue
                        ring.cond.wait(POLL if laggards else None)
                    if not waited:
                        self._lag_since.clear()  # the ring is pacing nobody
                    if self._stop.is_set():
                        return total
                view = ring.slots[seq % len(ring.slots)][:limit]
            if extents is not None:
                self._position_source(offset, view)
            length = read_full(self.source, view)
            self._source_pos += length
            if extents is not None:
                if length < limit:
                    raise SourceChanged(extents[-1][0] + extents[-1][1], offset + length)
                assert index is not None
                checker = self._check_extent(index, offset, view[:length], checker)
            if length and digests is not None:
                digests.append(xxhash.xxh3_128_digest(view[:length]))
                self._extent_list.append((offset, length))
            total += length
            if first:
                first = False
                self._held_length = length
                if length < limit and extents is None:
                    break
                continue
            if length:
                with ring.cond:
                    slot = seq % len(ring.slots)
                    ring.lengths[slot] = length
                    ring.offsets[slot] = offset
                    ring.head = seq + 1
                    ring.cond.notify_all()
                seq += 1
            if length < limit:
                break
        if extents is None and self._expected_size not in (None, total):
            raise SourceChanged(self._expected_size, total)  # type: ignore[arg-type]
        with ring.cond:
            self._source_total = total
            ring.eof = True
            ring.cond.notify_all()
        return total

    def _check_extent(self, index: int, offset: int, data: memoryview, checker: Any) -> Any:
        """Hash each extent as it is read and compare with its expected checksum."""
        assert self._extents is not None
        start, length, expected = self._extents[index]
        if expected is None or self._extent_algo is None:
            return None
        if offset == start:
            checker = hashlib.new(self._extent_algo)
        checker.update(data)
        if offset + len(data) == start + length and checker.hexdigest() != expected:
            raise ExtentChecksumError(start, length, self._extent_algo)
        return checker

    def _detach_laggards(self, seq: int) -> bool:
        """Let the slowest destinations leave the ring when someone else waits for data.

        Called by the reader, holding the ring's lock, when bucket ``seq`` has no free slot.
        The laggards stop holding the ring at once, even while one of them is blocked inside a
        write: it may still be writing from the oldest bucket, so that bucket's memory is left
        to it and the ring gets a fresh bucket in its place (freed when its write returns).
        It then goes on alone from where it is.  Returns True when someone was detached.
        """
        ring = self._ring
        now = time.monotonic()
        oldest = seq - len(ring.slots)
        behind = {wid for wid, pos in ring.positions.items() if pos <= oldest}
        for wid in list(self._lag_since):
            if wid not in behind:
                del self._lag_since[wid]  # it caught up: jitter, not a slower drive
        # Held back means caught up and waiting for this very bucket: a worker that is listed
        # as waiting but has buckets to write has simply not been scheduled yet.
        if not any(ring.positions.get(wid, -1) >= seq for wid in ring.starving):
            return False
        for wid in behind:
            self._lag_since.setdefault(wid, now)
        # A drive that holds the others back for a moment (scheduling, a stick's brief pause)
        # stays in the ring; one that keeps doing so for LAGGARD_PATIENCE goes on alone.  So
        # drives of one speed never pay for a second read of the source because of jitter.
        laggards = [wid for wid in behind if now - self._lag_since[wid] >= LAGGARD_PATIENCE]
        if not laggards:
            return False
        for wid in laggards:
            worker = self._workers[wid]
            worker.detach = True
            worker.solo = True
            del ring.positions[wid]
        # The laggards keep the old bucket's memory (one may be writing from it).  The fresh
        # one gets the same bytes, because a drive that stays in the ring may still need that
        # bucket: it may have moved to it without having taken its view yet.
        slot = seq % len(ring.slots)
        fresh = memoryview(aligned_buffer(self._bucket_size))
        fresh[: ring.lengths[slot]] = ring.slots[slot][: ring.lengths[slot]]
        ring.slots[slot] = fresh
        ring.cond.notify_all()
        return True


# --------------------------------------------------------------------------------------------


class BusWriter(_Broadcast):
    """Read ``source`` once and write it to every destination in parallel.

    ``callback`` receives :class:`BusWriterMessage` values on the calling thread;
    ``cancel()`` is polled at least once per bucket and every 100 ms while waiting.

    Every drive at its own speed: a destination that keeps a caught-up one waiting for
    :data:`LAGGARD_PATIENCE` while a full ring behind leaves the ring and reads the rest of a
    seekable file source with ``os.preadv`` into a 4 MiB buffer of its own (served by the
    page cache for images that fit in memory).  A stream source (a decompressor, a pipe)
    cannot be re-read, so its destinations stay in lock-step with the slowest one.  Memory
    is bounded either way: (buckets + 1) x bucket size, plus 4 MiB per solo destination.
    """

    def __init__(self, source: Any, destinations: Sequence[Any], callback: Callback,
                 cancel: CancelCheck) -> None:
        super().__init__(source, destinations, callback, cancel)
        self._record = False
        self._hold_first = False
        self._laggards = True
        self._skip_identical = False
        self._extent_list: list[tuple[int, int]] = []

    def record_digests(self, enabled: bool = True) -> BusWriter:
        """Record an XXH3-128 digest per bucket, for :meth:`BusVerifier.with_digests`."""
        self._record = enabled
        return self

    def first_bucket_last(self, enabled: bool = True) -> BusWriter:
        """Write everything but the first bucket and return that one in ``WriteResult.held``.

        The caller writes it last (after verifying the rest), so an interrupted drive never
        holds a complete-looking boot sector.  Needs seekable destinations; costs one bucket.
        """
        self._hold_first = enabled
        return self

    def only_extents(self, extents: Sequence[tuple[int, int, str | None]],
                     algo: str | None = None) -> BusWriter:
        """Read and write only these (offset, length, checksum) ranges, in order.

        For sparse images with a block map: the gaps are neither read nor written.  Each
        range's data is checked against its hex ``checksum`` (in ``algo``, e.g. "sha256")
        as it is read; a mismatch fails the run like a source error.  Destinations stay in
        lock-step (no laggards), since a laggard's own reads would not follow the ranges.
        """
        self._extents = tuple(extents)
        self._extent_algo = algo
        return self

    def skip_identical(self, enabled: bool = True) -> BusWriter:
        """Read what each destination holds first and write only the chunks that differ.

        Costs a read per chunk; wins when the drive mostly holds the image already (a
        re-flash, or a resumed one).  Destinations must be readable and seekable.
        ``Skipped`` messages count the bytes left alone.
        """
        self._skip_identical = enabled
        return self

    def laggards(self, enabled: bool = True) -> BusWriter:
        """Let a destination a full ring behind go on alone (seekable file sources only)."""
        self._laggards = enabled
        return self

    def _errored(self, index: int, why: OSError) -> Any:
        return BusWriterMessage.Errored(index, why)

    def _has_solo(self) -> bool:
        return any(w.solo and not (w.finished or w.abandoned) for w in self._workers)

    def source_read(self) -> WriteResult:
        """What the source gave (size, digests, held first bucket), without any results.

        Complete once the source has been read to its end, which every ``Completed`` message
        follows: a callback can hand it to a drive's own verification while others are still
        being written.
        """
        held = self._held_view
        return WriteResult(
            results=(),
            size=self._source_total or 0,
            bucket_size=self._bucket_size,
            digests=tuple(self._digest_list or ()),
            held=held[: self._held_length] if held is not None else None,
            extents=tuple(self._extent_list),
        )

    def write(self) -> WriteResult:
        """Run to the end; see the class docstring for what is raised and when."""
        if self._hold_first:
            for dest in self.destinations:
                if not (hasattr(dest, "seek") and (not hasattr(dest, "seekable")
                                                   or dest.seekable())):
                    raise ValueError("first_bucket_last needs seekable destinations")
        self._ring = _Ring(self._make_slots())
        held = memoryview(aligned_buffer(self._bucket_size)) if self._hold_first else None
        self._held_length = 0
        digests: list[bytes] | None = [] if self._record else None
        self._extent_list = []
        lock_step = not self._laggards or self._extents is not None
        pread = None if lock_step else _pread_source(self.source)
        self._pread = pread
        workers = [_Worker(i, d) for i, d in enumerate(self.destinations)]
        for w in workers:
            self._ring.positions[w.id] = 0
        size = [0]

        self._digest_list, self._held_view = digests, held

        def reader() -> None:
            size[0] = self._reader_loop(held, digests, pread is not None)

        reader_error = self._run(workers, [self._write_worker] * len(workers), reader)
        if reader_error is not None:
            raise reader_error
        results = tuple(DestinationResult(w.id, w.done, w.error, w.skipped) for w in workers)
        if all(r.error is not None for r in results):
            raise AllDestinationsFailed(results)
        return WriteResult(
            results=results,
            size=size[0],
            bucket_size=self._bucket_size,
            digests=tuple(digests or ()),
            held=held[: self._held_length] if held is not None else None,
            extents=tuple(self._extent_list),
        )

    def _write_worker(self, w: _Worker) -> None:
        ring = self._ring
        dest = w.dest
        position = 0  # where the destination's file position is
        pos = 0

        def progressed(n: int) -> None:
            w.done += n
            w.last_progress = time.monotonic()
            self._queue.put(BusWriterMessage.Written(w.id, w.done))

        resume: int | None = None  # where to go on alone once detached from the ring
        while True:
            with ring.cond:
                w.waiting = True
                ring.starving.add(w.id)
                if self._pread is not None and pos >= ring.head and not ring.eof:
                    ring.cond.notify_all()  # the reader may let a laggard go now
                while (not self._stop.is_set() and not w.detach and pos >= ring.head
                       and not ring.eof):
                    ring.cond.wait()
                ring.starving.discard(w.id)
                w.waiting = False
                w.last_progress = time.monotonic()
                if self._stop.is_set() or w.abandoned:
                    return
                if w.detach and self._pread is not None:
                    # Bucket ``pos`` may already hold later data: never read it.
                    resume = position if pos else self._held_length
                    break
                if pos >= ring.head:
                    break  # end of source
                slot = pos % len(ring.slots)
                view = ring.slots[slot][: ring.lengths[slot]]
                offset = ring.offsets[slot]
            if offset != position:
                _seek(dest, offset)
            done = 0
            length = len(view)
            while done < length:
                if w.detach and self._pread is not None:
                    resume = offset + done
                    break
                n = self._put(w, view[done : done + CHUNK], offset + done, progressed)
                if self._stop.is_set() or w.abandoned:
                    return
                done += n
            del view  # a detached laggard's bucket is freed here, not kept while it goes solo
            if resume is not None:
                break
            position = offset + length
            pos += 1
            with ring.cond:
                if w.id in ring.positions:
                    ring.positions[w.id] = pos
                ring.cond.notify_all()
        if resume is not None:
            with ring.cond:
                ring.positions.pop(w.id, None)
                w.solo = True
                ring.cond.notify_all()
            self._write_solo(w, resume, progressed)
        self._finish_write(w)

    def _write_solo(self, w: _Worker, offset: int, progressed: Callable[[int], None]) -> None:
        """Go on alone: positional reads of the source into one chunk-sized buffer."""
        assert self._pread is not None
        fd, base = self._pread
        buf = memoryview(aligned_buffer(CHUNK))
        _seek(w.dest, offset)
        while not self._stop.is_set() and not w.abandoned:
            total = self._source_total
            if total is not None and offset >= total:
                return
            want = buf if total is None else buf[: min(len(buf), total - offset)]
            n = os.preadv(fd, [want], base + offset)
            if n == 0:
                # A laggard on its own can overtake the ring's reader: the source's end is
                # only known once the reader reaches it.
                end = self._source_end(w) if total is None else total
                if end is None or end == offset:
                    return
                raise SourceChanged(end, offset)  # the file shrank under us
            self._put(w, buf[:n], offset, progressed)
            offset += n

    def _put(self, w: _Worker, view: memoryview, offset: int,
             progressed: Callable[[int], None]) -> int:
        """Write one chunk at ``offset`` (the destination is there), unless it holds it already."""
        if self._skip_identical and self._holds(w, view, offset):
            w.skipped += len(view)
            w.last_progress = time.monotonic()
            self._queue.put(BusWriterMessage.Skipped(w.id, w.skipped))
            return len(view)
        return write_all(w.dest, view, offset=offset, stop=self._stop, progress=progressed,
                         retries=self._retries)

    def _holds(self, w: _Worker, view: memoryview, offset: int) -> bool:
        if w.compare is None:
            w.compare = memoryview(aligned_buffer(CHUNK))
        mine = w.compare[: len(view)]
        got = read_full(w.dest, mine)
        same = got == len(view) and (
            xxhash.xxh3_128_digest(mine) == xxhash.xxh3_128_digest(view))
        if not same:
            _seek(w.dest, offset)
        return same

    def _source_end(self, w: _Worker) -> int | None:
        """Wait for the reader to reach the source's end; None if the run stops first."""
        ring = self._ring
        with ring.cond:
            w.waiting = True  # waiting for the reader is not a stall
            while self._source_total is None and not self._stop.is_set() and not w.abandoned:
                ring.cond.wait(POLL)
            w.waiting = False
            w.last_progress = time.monotonic()
        return None if self._stop.is_set() or w.abandoned else self._source_total

    def _finish_write(self, w: _Worker) -> None:
        if self._stop.is_set():
            return
        w.waiting = False
        w.last_progress = time.monotonic()
        sync(w.dest)
        if not self._stop.is_set() and not w.abandoned:
            self._queue.put(BusWriterMessage.Completed(w.id))
        with self._ring.cond:
            self._ring.positions.pop(w.id, None)
            self._ring.cond.notify_all()


class BusVerifier(_Broadcast):
    """Read every destination back and compare it with the source, or with recorded digests.

    With :meth:`with_digests` the source is not read again: each destination is hashed bucket
    by bucket and checked against the writer's digests, so a compressed or streamed source is
    read once in all.  Destinations should be opened so that reads reach the device (O_DIRECT,
    or after dropping their cached pages): the engine reads whatever they return.
    """

    def __init__(self, source: Any, destinations: Sequence[Any], callback: Callback,
                 cancel: CancelCheck) -> None:
        super().__init__(source, destinations, callback, cancel)
        self._digests: tuple[bytes, ...] | None = None
        self._size = 0
        self._indices: Sequence[int] = ()
        self._digest_extents: Sequence[tuple[int, int]] = ()
        self._report_all = False

    def with_digests(self, digests: Sequence[bytes], bucket_size: int, size: int,
                     *, first: int = 0, last: int | None = None,
                     extents: Sequence[tuple[int, int]] = (),
                     only: Sequence[int] | None = None,
                     report_all: bool = False) -> BusVerifier:
        """Check buckets ``first``..``last`` (exclusive), or the ``only`` ones, by digest.

        ``extents`` gives each digest's (offset, length) when buckets are not simply
        consecutive (a block map's ranges); by default bucket ``i`` starts at
        ``i * bucket_size``.  With ``report_all`` every bad bucket gets an ``Invalid``
        message (so that a caller can repair them all) instead of only the first.
        """
        self._digests = tuple(digests)
        self._bucket_size = bucket_size
        self._bucket = None
        self._size = size
        end = len(self._digests) if last is None else min(last, len(self._digests))
        self._indices = list(only) if only is not None else range(first, end)
        self._digest_extents = extents
        self._report_all = report_all
        return self

    def _extent(self, index: int) -> tuple[int, int]:
        if self._digest_extents:
            return self._digest_extents[index]
        start = index * self._bucket_size
        return start, min(self._bucket_size, self._size - start)

    def _errored(self, index: int, why: OSError) -> Any:
        return BusVerifierMessage.Errored(index, why)

    def verify(self) -> list[bool]:
        """Run to the end; returns, per destination, whether it matched.

        Raises :class:`Cancelled` when cancelled and the source's error when reading it fails.
        """
        workers = [_Worker(i, d) for i, d in enumerate(self.destinations)]
        self._verdicts = [False] * len(workers)
        if self._digests is not None:
            self._ring = None  # type: ignore[assignment]
            error = self._run(workers, [self._digest_worker] * len(workers), None)
        else:
            if hasattr(self.source, "seek") and getattr(self.source, "seekable", lambda: 1)():
                self.source.seek(0)
            self._ring = _Ring(self._make_slots())
            for w in workers:
                self._ring.positions[w.id] = 0

            def reader() -> None:
                self._reader_loop(None, None, False)

            error = self._run(workers, [self._compare_worker] * len(workers), reader)
        if error is not None:
            raise error
        return list(self._verdicts)

    def _rewind(self, dest: Any, offset: int = 0) -> None:
        if hasattr(dest, "seek") and getattr(dest, "seekable", lambda: True)():
            dest.seek(offset)

    def _read_into(self, w: _Worker, view: memoryview) -> int:
        """Read up to len(view) from the destination; short only where it ends."""
        return read_full(w.dest, view)

    def _progress(self, w: _Worker, n: int) -> None:
        w.done += n
        w.last_progress = time.monotonic()
        self._queue.put(BusVerifierMessage.Read(w.id, w.done))

    def _compare_worker(self, w: _Worker) -> None:
        ring = self._ring
        self._rewind(w.dest)
        mine = memoryview(aligned_buffer(CHUNK))
        pos = 0
        while True:
            with ring.cond:
                w.waiting = True
                ring.starving.add(w.id)
                while not self._stop.is_set() and pos >= ring.head and not ring.eof:
                    ring.cond.wait()
                ring.starving.discard(w.id)
                w.waiting = False
                w.last_progress = time.monotonic()
                if self._stop.is_set():
                    return
                if pos >= ring.head:
                    break
                slot = pos % len(ring.slots)
                theirs = ring.slots[slot][: ring.lengths[slot]]
                offset = ring.offsets[slot]
            for start in range(0, len(theirs), CHUNK):
                if self._stop.is_set():
                    return
                want = theirs[start : start + CHUNK]
                got = self._read_into(w, mine[: len(want)])
                a, b = mine[:got], want[:got]
                if xxhash.xxh3_128_digest(a) != xxhash.xxh3_128_digest(b):
                    return self._invalid(w, offset + start + first_difference(a, b))
                if got:  # a Read that adds nothing would repeat the last count
                    self._progress(w, got)
                if got < len(want):
                    return self._invalid(w, offset + start + got)
            pos += 1
            with ring.cond:
                if w.id in ring.positions:
                    ring.positions[w.id] = pos
                ring.cond.notify_all()
        self._valid(w)

    def _digest_worker(self, w: _Worker) -> None:
        assert self._digests is not None
        mine = memoryview(aligned_buffer(min(CHUNK, self._bucket_size)))
        w.waiting = False
        bad = False
        for index in self._indices:
            start, length = self._extent(index)
            self._rewind(w.dest, start)
            hasher = xxhash.xxh3_128()
            done = 0
            while done < length:
                if self._stop.is_set():
                    return
                got = self._read_into(w, mine[: min(len(mine), length - done)])
                hasher.update(mine[:got])
                done += got
                if got == 0:
                    return self._invalid(w, start + done)  # the destination ended early
                self._progress(w, got)
            if hasher.digest() != self._digests[index]:
                if not self._report_all:
                    return self._invalid(w, start, start + length)
                bad = True
                self._queue.put(BusVerifierMessage.Invalid(w.id, start, start + length))
        if bad:
            self._leave_ring(w)
        else:
            self._valid(w)

    def _invalid(self, w: _Worker, offset: int, end: int | None = None) -> None:
        self._leave_ring(w)
        self._queue.put(BusVerifierMessage.Invalid(w.id, offset, end))

    def _valid(self, w: _Worker) -> None:
        self._verdicts[w.id] = True
        self._leave_ring(w)
        self._queue.put(BusVerifierMessage.Valid(w.id))
