"""A drive read once into an image file: O_DIRECT reads, compressed by the file's suffix,
hashed (SHA-256 of the file, for its sidecar) and mapped (bmaptool's block map) on the way.

One thread reads the drive (through :mod:`popsicle_py.blockdev`, paced, into a few aligned
buffers) while the caller's thread compresses and writes, so the drive never waits for the
compressor unless it is slower.  A drive that moves less than STALL_BYTES in the stall
timeout is given up (the reading thread is left to the kernel: nothing waits for it); a slow
drive that keeps moving is read to its end.  Everything is written to a file the caller
opened (a temporary name): naming it is the caller's job.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import lzma
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import IO, Protocol, cast

from popsicle_py.blockdev import BlockDevice, read_full, seek
from popsicle_py.buffers import aligned_buffer
from popsicle_py.errors import Stalled
from popsicle_py.fsmap import KEEP
from popsicle_py.pacing import Clock, Pacer
from popsicle_py.records import record
from popsicle_py.signals import keep_signals_for_main_thread

#: Compression by OUTPUT's suffix; anything else is written raw.
SUFFIXES = {".zst": "zstd", ".xz": "xz", ".gz": "gzip"}
#: Suffixes that name a compression or archive read does not write: refused, never written
#: raw under a name that says otherwise (bunzip2 would fail on it, a person would trust it).
NOT_WRITTEN = frozenset({".bz2", ".lz4", ".lzma", ".lz", ".zip", ".7z", ".rar", ".tar",
                         ".tgz", ".zstd"})
BMAP_BLOCK = 4096
DEFAULT_BUCKET = 8 << 20
BUFFERS = 3
ZSTD_LEVEL = 3
#: zstd's output is hashed and written in chunks of up to this size.
ZSTD_CHUNK = 1 << 20
#: At most this many chunks of compressed output wait for the spool's thread.
SPOOL_DEPTH = 32
#: The largest write call to OUTPUT: each is timed (one that does not return is a stall of
#: OUTPUT's file system), and a slow disk's throttled page cache answers this much promptly.
WRITE_CALL = 1 << 20
#: xz and gzip are fed this much at a time: a stop is heard between pieces (xz takes a
#: second or more for a whole bucket of incompressible bytes).
STREAM_PIECE = 1 << 20


def format_for(path: str) -> str:
    """``zstd``, ``xz``, ``gzip`` or ``raw``, from OUTPUT's suffix."""
    return SUFFIXES.get(os.path.splitext(path)[1].lower(), "raw")


def bmap_path_for(output: str) -> str:
    """Where bmaptool (and our flash) look for the map of OUTPUT: its name without the
    compression suffix, plus ``.bmap`` (disk.img.zst -> disk.img.bmap)."""
    stem, ext = os.path.splitext(output)
    return (stem if ext.lower() in SUFFIXES else output) + ".bmap"


def map_paths_for(output: str) -> tuple[str, ...]:
    """Every name where flash looks for OUTPUT's block map (:func:`popsicle_py.bmap.sidecar`:
    OUTPUT.bmap first, then the name without the compression suffix, plus .bmap)."""
    return tuple(dict.fromkeys((output + ".bmap", bmap_path_for(output))))


def sidecar_path_for(output: str) -> str:
    """OUTPUT.sha256, which flash finds next to the image."""
    return output + ".sha256"


def sidecar_line(sha256: str, name: str) -> bytes:
    r"""OUTPUT.sha256's line as GNU sha256sum writes it, so ``sha256sum -c`` reads it: the
    name's own bytes (any, not only UTF-8), and a name holding a backslash, newline or
    carriage return escaped (``\\``, ``\n``, ``\r``) behind a leading backslash."""
    raw = os.fsencode(name)
    if not any(c in raw for c in (b"\\", b"\n", b"\r")):
        return sha256.encode() + b"  " + raw + b"\n"
    escaped = raw.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
    return b"\\" + sha256.encode() + b"  " + escaped + b"\n"


# --------------------------------------------------------------------------------------------
# The file side: hashing sink and compressors


class OutputStalled(OSError):
    """A write to OUTPUT did not return for the stall timeout (ETIMEDOUT): the file system
    it is on stopped answering (a hung disk or network share, a frozen file system)."""

    def __init__(self, limit: float) -> None:
        super().__init__(errno.ETIMEDOUT, f"no write returned for {limit:g} s")
        self.limit = limit


class Sink:
    """Writes whole buffers to a descriptor it owns and hashes them (the SHA-256 of OUTPUT).

    Each write call is timed on :attr:`clock` (a call that does not return is a stall of the
    output, not of the drive).  :meth:`close` is safe while another thread is inside a write
    (one hung on a file system that stopped answering): no write starts after it, and the
    number is closed by whichever of the two finishes last, so a late write never reaches a
    file opened since under the same number."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.hasher = hashlib.sha256()
        self.written = 0
        self.clock = Clock()
        self._lock = threading.Lock()
        self._busy = 0  # write calls in flight
        self._closing = False

    def write(self, data: bytes | memoryview) -> int:
        self.hasher.update(data)
        return self.put(data)

    def put(self, data: bytes | memoryview) -> int:
        """Write without hashing (the caller hashes the same bytes on another thread)."""
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            with self._lock:
                if self._closing:
                    raise OSError(errno.EBADF, "the output was closed")
                self._busy += 1
            try:
                with self.clock.busy():
                    n = os.write(self.fd, view[done:done + WRITE_CALL])
            finally:
                self._leave()
            if n <= 0:
                raise OSError(errno.ENOSPC, "no space left on the output's file system")
            self.clock.advance(n)
            done += n
        self.written += done
        return done

    def flush(self) -> None:
        """zstandard's writer flushes its sink; every write above is already in the kernel."""

    @property
    def in_call(self) -> bool:
        """A write of another thread has not returned (a file system that stopped answering)."""
        with self._lock:
            return self._busy > 0

    def _leave(self) -> None:
        self._settle(-1)

    def close(self) -> None:
        """No write after this; the descriptor closed now, or when the write under way ends."""
        self._settle(0, closing=True)

    def _settle(self, change: int, closing: bool = False) -> None:
        """Count a write's end (or the close); close the descriptor once closing with no
        write in flight, by whichever of the two comes last."""
        with self._lock:
            self._busy += change
            self._closing |= closing
            fd = self.fd if self._closing and not self._busy else -1
            self.fd = -1 if fd >= 0 else self.fd
        if fd >= 0:
            os.close(fd)


class Spool:
    """OUTPUT's side on a thread of its own, for the single-threaded compressors (xz, gzip) and
    raw copies: the SHA-256 and the file system take the second core instead of waiting
    their turn on the compressing thread.

    :meth:`write` queues a chunk (at most ``depth`` wait) that the thread hashes and writes;
    :meth:`put` has the thread write a buffer the caller still owns and hashes, and returns a
    wait for it.  The sink's error (ENOSPC...) is raised in the caller's thread at its next
    call or at :meth:`close`.  :meth:`abandon` drops what waits and returns at once, even
    while the thread's write hangs: the sink's :meth:`Sink.close` keeps that write from
    reaching any other file."""

    def __init__(self, sink: Sink, depth: int = SPOOL_DEPTH) -> None:
        self.sink = sink
        self._depth = depth
        self._items: collections.deque[tuple[bytes | memoryview, bool,
                                             threading.Event | None]] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False  # nothing more comes: the thread ends once it wrote what waits
        self.dropping = False  # abandoned: what waits is dropped, nothing more is taken
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="popsicle-output", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        keep_signals_for_main_thread()
        while True:
            with self._cond:
                while not (self._items or self._closed or self.dropping):
                    self._cond.wait()
                if self.dropping or not self._items:
                    return
                data, hashed, done = self._items.popleft()
                self._cond.notify_all()
            try:
                if self._error is None:
                    (self.sink.write if hashed else self.sink.put)(data)
            except BaseException as exc:  # raised in the caller's thread
                self._error = exc
            finally:
                if done is not None:
                    done.set()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _queue(self, data: bytes | memoryview, hashed: bool,
               done: threading.Event | None) -> None:
        with self._cond:
            while len(self._items) >= self._depth and not self.dropping:
                self._cond.wait()
            if self.dropping:
                if done is not None:
                    done.set()
                return
            self._items.append((data, hashed, done))
            self._cond.notify_all()

    def write(self, data: bytes | memoryview) -> int:
        """Hash and write ``data`` on the thread (a view is copied: the caller reuses it)."""
        self._check()
        chunk = data if isinstance(data, bytes) else bytes(data)
        self._queue(chunk, True, None)
        return len(chunk)

    def put(self, data: memoryview) -> Callable[[], None]:
        """Write ``data`` (not hashed, not copied) on the thread; call the result before
        reusing ``data``: it waits for the write and raises its error."""
        self._check()
        done = threading.Event()
        self._queue(data, False, done)

        def wait() -> None:
            done.wait()
            self._check()
        return wait

    def flush(self) -> None:
        """zstandard's writer flushes its sink: what is queued is written in order anyway."""

    def close(self) -> None:
        """Wait until everything queued is hashed and written; raise the sink's error."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self._check()

    def abandon(self) -> None:
        """Drop what waits (its waits return); returns at once."""
        with self._cond:
            self.dropping = True
            for _, _, done in self._items:
                if done is not None:
                    done.set()
            self._items.clear()
            self._cond.notify_all()


class Hasher(Protocol):
    """A hashlib object, as far as the map needs one (importing images' would cost start-up)."""

    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


class Encoder(Protocol):
    def write(self, data: memoryview) -> None: ...

    def finish(self) -> None:
        """Everything written, hashed and in the kernel (or the sink's error raised)."""

    def abandon(self) -> None:
        """Stop without finishing (called from another thread than :meth:`write`'s); returns
        at once.  A write under way stops at its next piece; closing the sink then keeps
        anything late from the descriptor."""


class _Raw:
    """The drive's bytes as they are: hashed on the caller's thread while the spool's thread
    writes the same buffer, so a chunk costs the longer of the two, not their sum."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.spool = Spool(sink)

    def write(self, data: memoryview) -> None:
        written = self.spool.put(data)
        self.sink.hasher.update(data)
        written()

    def finish(self) -> None:
        self.spool.close()

    def abandon(self) -> None:
        self.spool.abandon()


class _Zstd:
    """Multithreaded zstd (one worker per CPU, as ``zstd -T0``), the drive's size in the frame
    header.  Its output is hashed and written on the caller's thread, between feeds, in
    chunks of up to ``ZSTD_CHUNK``: on two cores the workers keep both busy, and a thread of
    its own for the output (tried) only added hand-offs and cache misses.  Big chunks mean
    few hand-offs of the GIL (each costs a wait on a loaded machine): 1 MiB measured 5 to
    15% faster than zstd's 128 KiB at a load of 6 to 10 on two cores."""

    def __init__(self, sink: Sink, size: int) -> None:
        import zstandard

        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1, write_content_size=True,
                                        write_checksum=True)  # as zstd(1): damage is found
        self.writer = cctx.stream_writer(cast(IO[bytes], sink), size=size, closefd=False,
                                         write_size=ZSTD_CHUNK, write_return_read=True)

    def write(self, data: memoryview) -> None:
        self.writer.write(data)

    def finish(self) -> None:
        self.writer.close()  # type: ignore[no-untyped-call]

    def abandon(self) -> None:
        pass


class Compressor(Protocol):
    """What lzma's and zlib's compressor objects share."""

    def compress(self, data: memoryview, /) -> bytes: ...

    def flush(self) -> bytes: ...


class _Streaming:
    """xz or gzip through the standard library's compressor objects, fed in pieces of
    ``STREAM_PIECE``: xz takes a second or more for a whole bucket of incompressible bytes,
    and a stop is honoured between pieces."""

    def __init__(self, sink: Sink, compressor: Compressor) -> None:
        self.spool = Spool(sink)
        self.compressor = compressor

    def write(self, data: memoryview) -> None:
        for start in range(0, len(data), STREAM_PIECE):
            if self.spool.dropping:
                return
            out = self.compressor.compress(data[start:start + STREAM_PIECE])
            if out:
                self.spool.write(out)

    def finish(self) -> None:
        self.spool.write(self.compressor.flush())
        self.spool.close()

    def abandon(self) -> None:
        self.spool.abandon()


def encoder(fmt: str, sink: Sink, size: int) -> Encoder:
    if fmt == "zstd":
        return _Zstd(sink, size)
    if fmt == "xz":
        return _Streaming(sink, lzma.LZMACompressor(lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                                    preset=6))
    if fmt == "gzip":  # zlib-ng: the same format and ratio as zlib's level 6, 1.7x as fast
        from zlib_ng import zlib_ng

        return _Streaming(sink, zlib_ng.compressobj(6, zlib_ng.DEFLATED, 31))
    return _Raw(sink)


# --------------------------------------------------------------------------------------------
# The block map


class Mapper:
    """Follows the drive's bytes block by block: runs of blocks that are not all zero (and not
    free in a file system, see :mod:`popsicle_py.fsmap`) become ranges of the map, each with
    the SHA-256 of its bytes (bmaptool's format 2.0)."""

    def __init__(self, block: int = BMAP_BLOCK, free: bytearray | None = None) -> None:
        self.block = block
        #: One byte per block: FREE where a file system says so (left out), KEEP (fsmap).
        self.free = free
        self.zero = bytes(block)
        self.ranges: list[tuple[int, int, str]] = []  # first block, last block, sha256
        self._first: int | None = None
        self._hasher: Hasher = hashlib.sha256()  # of the range open (when _first is set)
        self._zeros = b""

    def feed(self, offset: int, data: memoryview) -> None:
        """``data`` at ``offset`` (a multiple of the block), in order."""
        block = self.block
        if len(self._zeros) < len(data):
            self._zeros = bytes(len(data))
        free = self.free
        if data == self._zeros[: len(data)] and not (free and KEEP in free[
                offset // block:-(-(offset + len(data)) // block)]):
            self._close(offset // block - 1)
            return
        run = 0  # start (in data) of the bytes not yet hashed
        for start in range(0, len(data), block):
            piece = data[start:start + block]
            index = (offset + start) // block
            mark = free[index] if free else 0
            if mark == KEEP or (mark == 0 and piece != self.zero[: len(piece)]):
                if self._first is None:
                    self._first, self._hasher, run = index, hashlib.sha256(), start
                continue
            if self._first is not None:
                self._hasher.update(data[run:start])
                self._close(index - 1)
        if self._first is not None:
            self._hasher.update(data[run:])

    def _close(self, last: int) -> None:
        if self._first is not None:
            self.ranges.append((self._first, last, self._hasher.hexdigest()))
            self._first = None

    def finish(self, size: int) -> list[tuple[int, int, str]]:
        self._close(-(-size // self.block) - 1)
        return self.ranges


def render_bmap(size: int, block: int, ranges: list[tuple[int, int, str]]) -> str:
    """The map as bmaptool 3.x writes it (version 2.0, SHA-256), its own checksum filled in."""
    count = -(-size // block)
    mapped = sum(last - first + 1 for first, last, _ in ranges)
    lines = ['<?xml version="1.0" ?>', '<bmap version="2.0">',
             f"    <ImageSize> {size} </ImageSize>", f"    <BlockSize> {block} </BlockSize>",
             f"    <BlocksCount> {count} </BlocksCount>",
             f"    <MappedBlocksCount> {mapped} </MappedBlocksCount>",
             "    <ChecksumType> sha256 </ChecksumType>",
             f"    <BmapFileChecksum> {'0' * 64} </BmapFileChecksum>", "    <BlockMap>"]
    for first, last, digest in ranges:
        span = f"{first}-{last}" if last != first else f"{first}"
        lines.append(f'        <Range chksum="{digest}"> {span} </Range>')
    lines += ["    </BlockMap>", "</bmap>", ""]
    text = "\n".join(lines)
    return text.replace("0" * 64, hashlib.sha256(text.encode()).hexdigest(), 1)


# --------------------------------------------------------------------------------------------
# Reading the drive


@record
class Read:
    """What was read and written: the drive's bytes, OUTPUT's bytes and SHA-256."""

    size: int
    written: int
    sha256: str


def read_drive(device: BlockDevice, size: int, enc: Encoder, sink: Sink, *,
               mapper: Mapper | None = None, bucket: int = DEFAULT_BUCKET,
               progress: Callable[[int], None] = lambda n: None,
               stopped: Callable[[], bool] = lambda: False,
               stall_timeout: float | None = 60.0) -> Read | None:
    """Read ``size`` bytes of ``device`` once, in order, into ``enc``; None when stopped.

    The caller's thread only watches (a stop, both stall clocks) and reports progress: the
    drive is read on one thread and its bytes encoded and written on another, so neither a
    drive nor an OUTPUT that stops answering holds it.  Raises the drive's OSError,
    :class:`~popsicle_py.errors.Stalled` (less than STALL_BYTES read in ``stall_timeout``),
    :class:`OutputStalled` (a write to OUTPUT did not return in ``stall_timeout``), or the
    output's OSError (ENOSPC...).  Returns without waiting for a call that hangs: the
    caller's :meth:`Sink.close` keeps whatever comes late from the descriptor.
    """
    from popsicle_py.engine.config import CANCEL_GRACE  # the engine: not at start-up

    free: queue.Queue[int] = queue.Queue()
    full: queue.Queue[tuple[int, int, int] | BaseException | None] = queue.Queue()
    encoded: queue.Queue[tuple[int, int] | None] = queue.Queue()
    buffers = [aligned_buffer(bucket) for _ in range(BUFFERS)]
    for i in range(BUFFERS):
        free.put(i)
    quit_ = threading.Event()
    clock = Clock()
    got = 0  # of the bucket being read: where a failed read began
    outcome: list[Read | BaseException] = []

    def counted(n: int) -> None:
        nonlocal got
        got += n
        clock.advance(n)

    def reader() -> None:
        nonlocal got
        keep_signals_for_main_thread()
        pacer = Pacer()
        offset = 0
        try:
            while offset < size and not quit_.is_set():
                i = free.get()  # waiting for the compressor is never a stall
                if i < 0:
                    return
                want = min(bucket, size - offset)
                got = 0
                with clock.busy():
                    seek(device, offset)
                    try:
                        n = read_full(device, memoryview(buffers[i])[:want], pacer=pacer,
                                      progress=counted, stop=quit_.is_set)
                    except OSError as exc:  # say where: the user can map it to a file
                        start = offset + got
                        end = start + min(pacer.size(), want - got) - 1
                        raise OSError(exc.errno, f"{exc.strerror or exc} (reading bytes "
                                      f"{start}-{end})") from exc
                if quit_.is_set():
                    return
                if n < want:
                    raise OSError(errno.EIO, f"the drive ended at byte {offset + n}, before "
                                  f"its size ({size} bytes)")
                full.put((i, offset, n))
                offset += n
            full.put(None)
        except BaseException as exc:  # handed to the caller's thread
            full.put(exc)

    def encoder_() -> None:
        keep_signals_for_main_thread()
        try:
            while (item := full.get()) is not None and not quit_.is_set():
                if isinstance(item, BaseException):
                    raise item
                i, offset, n = item
                with memoryview(buffers[i]) as whole, whole[:n] as view:
                    if mapper is not None:
                        mapper.feed(offset, view)
                    enc.write(view)
                encoded.put((i, n))  # the caller hands the buffer back to the reader
            if not quit_.is_set():
                enc.finish()
                outcome.append(Read(size, sink.written, sink.hasher.hexdigest()))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)
        finally:
            encoded.put(None)

    threads = [threading.Thread(target=reader, name="popsicle-read", daemon=True),
               threading.Thread(target=encoder_, name="popsicle-encode", daemon=True)]
    for thread in threads:
        thread.start()
    done = 0
    stalled = False  # the drive: its call is not waited for
    try:
        while True:
            if stopped():
                return None
            try:
                item = encoded.get(timeout=0.25)
            except queue.Empty:
                now = time.monotonic()
                if stall_timeout is not None and clock.stalled(now, stall_timeout):
                    stalled = True
                    moved = clock.recent
                    raise Stalled(f"stalled: no data from the drive for {stall_timeout:g} s"
                                  if not moved else f"stalled: only {moved // 1024} KiB from "
                                  f"the drive in {stall_timeout:g} s") from None
                if stall_timeout is not None and sink.clock.stalled(now, stall_timeout):
                    raise OutputStalled(stall_timeout) from None
                continue
            if item is None:
                break
            i, n = item
            free.put(i)
            done += n
            progress(done)
        result = outcome[0] if outcome else None
        if isinstance(result, BaseException):
            raise result
        return result
    finally:
        quit_.set()
        enc.abandon()
        free.put(-1)
        full.put(None)
        if not stalled:  # the drive's call under way (paced to half a second) ends soon
            threads[0].join(CANCEL_GRACE)
        if not any(t.is_alive() for t in threads):  # else one still holds a buffer: the GC
            for b in buffers:                          # frees them
                with contextlib.suppress(BufferError):
                    b.close()
