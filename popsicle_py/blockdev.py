"""Every byte moved to or from a drive: block devices opened for real I/O, and the calls on them.

:class:`BlockDevice` is a small file-like object the engine writes to and reads from.  It keeps
its own position and uses positional system calls (which release the GIL).  Requests that are
not aligned to the logical block size (the last bytes of an image whose size is not a multiple
of it) go through a one-block bounce buffer: the block is read, the image's bytes are laid over
it and the block is written back, so nothing past the image's end changes.

The loops over those calls live here too (:func:`write_all`, :func:`read_full`,
:func:`write_at`, :func:`read_at`, :func:`holds`), sized by a :class:`~.pacing.Pacer` so
that no single call outlasts about half a second of the drive's own measured speed: a
crawling stick is seen to make progress, a stall is declared on time and a cancel is
honoured at the next call.
"""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any, TypeAlias

import xxhash

from popsicle_py.buffers import address_of, aligned_buffer
from popsicle_py.errors import TooSmall
from popsicle_py.files import close_within, park_on_devnull

# Re-exported: flash checks the opened drive with blockdev.confirmed, and the failure wording
# imports MediaChanged from here; media identity itself lives in popsicle_py.media.
from popsicle_py.media import MediaChanged as MediaChanged
from popsicle_py.media import confirmed as confirmed
from popsicle_py.pacing import DEFAULT_RETRIES, MAX_CALL, RETRY_BACKOFF, TRANSIENT, Pacer
from popsicle_py.records import record

log = logging.getLogger(__name__)

#: What the engine reads from and writes to: a :class:`BlockDevice` or any file-like object.
#: The one seam left untyped on purpose: ``write``/``readinto``/``read`` are called, and
#: ``seek``, ``fileno``, ``flush`` and ``fsync`` used where the object has them.
FileLike: TypeAlias = Any

BLKFLSBUF = 0x1261
BLKRRPART = 0x125F
BLKSSZGET = 0x1268

WRITE_FLAGS = os.O_RDWR | os.O_SYNC | os.O_EXCL | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC

@record
class OpenSpec:
    """What opening needs to know of a drive (a :class:`~popsicle_py.drives.Drive` has it)."""

    path: str
    size: int
    logical_block_size: int = 512
    read_only: bool = False


class BlockDevice:
    """A drive opened for whole-device I/O, positioned like a file.

    Closing is safe while another thread is still inside a call on it (a stalled or cancelled
    drive's writer): the drive is let go at once (the descriptor is moved onto /dev/null, which
    drops the drive when that call returns), and the number itself is closed by whichever of the
    two finishes last.  So every descriptor is freed at the end of its drive's job, and a late
    write of an abandoned thread can never reach another drive opened since under the same
    number.
    """

    def __init__(self, fd: int, spec: OpenSpec, direct: bool) -> None:
        self.fd = fd
        self.path = spec.path
        self.size = spec.size
        self.block = max(512, spec.logical_block_size)
        self.direct = direct
        self.read_only = spec.read_only
        self.pos = 0
        self._bounce: memoryview | None = None
        self._lock = threading.Lock()
        self._busy = 0  # calls in flight
        self._closing = False  # close() was called while a call was in flight
        #: The same open drive without O_SYNC, for :meth:`at` (None: not opened yet; -1: none).
        self._plain: int | None = None

    # The file-like surface the engine uses.
    def fileno(self) -> int:
        return self.fd

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self.pos = offset
        elif whence == os.SEEK_CUR:
            self.pos += offset
        else:
            self.pos = self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        """Nothing is buffered in Python; fsync is :func:`sync`'s job."""

    @property
    def closed(self) -> bool:
        """Let go of (its number may still be held until a call of another thread returns)."""
        return self.fd < 0 or self._closing

    @property
    def in_call(self) -> bool:
        """A read or write of another thread has not returned (a hung drive)."""
        with self._lock:
            return self._busy > 0

    def _enter(self, plain: bool = False) -> int:
        if plain and self._plain is None:
            self._open_plain()
        with self._lock:
            if self.fd < 0 or self._closing:
                raise OSError(errno.EBADF, f"{self.path} was closed")
            self._busy += 1
            return self._plain if plain and self._plain is not None and self._plain >= 0 \
                else self.fd

    def _open_plain(self) -> None:
        """The drive once more, through this descriptor (so the same device, whatever its
        name now), without O_SYNC; -1 where that is refused (a descriptor from udisks2: the
        user may not open the node) or pointless (read-only, not O_SYNC).

        Opened outside the lock (opening a stick can wait on it, and :meth:`close` must not),
        kept only if the drive was not let go meanwhile: then the number may name another
        file, and what was opened is closed unused.
        """
        fd = -1
        try:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            if not self.read_only and flags & os.O_SYNC & ~os.O_DSYNC:
                fd = os.open(f"/proc/self/fd/{self.fd}",
                             os.O_RDWR | os.O_CLOEXEC | (flags & os.O_DIRECT))
        except OSError as exc:
            log.debug("%s: no second descriptor without O_SYNC: %s", self.path, exc)
        with self._lock:
            if self._plain is None and self.fd >= 0 and not self._closing:
                self._plain, fd = fd, -1
        if fd >= 0:
            os.close(fd)

    def _leave(self) -> None:
        with self._lock:
            self._busy -= 1
            if self._closing and self._busy == 0:
                self._close_now()

    def _aligned_prefix(self, view: memoryview) -> memoryview:
        """Split off the whole blocks of an aligned request; its short tail comes next call."""
        b = self.block
        if self.direct and len(view) > b and self.pos % b == 0 and _memory_aligned(view, b):
            return view[: len(view) - len(view) % b]
        return view

    def _aligned(self, view: memoryview) -> bool:
        b = self.block
        return (not self.direct) or (
            self.pos % b == 0 and len(view) % b == 0 and _memory_aligned(view, b)
        )

    def write(self, data: memoryview | bytes) -> int:
        view = memoryview(data).cast("B")
        if self.size and self.pos + len(view) > self.size:
            if self.pos >= self.size:
                raise TooSmall()
            view = view[: self.size - self.pos]
        if not view:
            return 0
        view = self._aligned_prefix(view)
        fd = self._enter()
        try:
            n = os.pwrite(fd, view, self.pos) if self._aligned(view) else \
                self._bounce_write(fd, view)
        finally:
            self._leave()
        self.pos += n
        return n

    def at(self, offset: int, view: memoryview, *, write: bool = False,
           synced: bool = True) -> int:
        """One pread or pwrite at ``offset`` of a view the caller made of whole, aligned blocks:
        the probe's single blocks, without readinto's splitting, bouncing and position
        keeping (half the probe's CPU, which 32 drives' probes share: issue 30).

        ``synced=False`` writes without O_SYNC where a second descriptor can be had: the
        probe's stamps, made durable by one :meth:`fsync` per pass instead of a cache flush
        (two, on a loop device) for each block.
        """
        fd = self._enter(plain=write and not synced)
        try:
            return os.pwrite(fd, view, offset) if write else os.preadv(fd, [view], offset)
        finally:
            self._leave()

    def readinto(self, buffer: memoryview | bytearray) -> int:
        view = memoryview(buffer).cast("B")
        if self.size:
            view = view[: max(0, self.size - self.pos)]
        if not view:
            return 0
        view = self._aligned_prefix(view)
        fd = self._enter()
        try:
            n = os.preadv(fd, [view], self.pos) if self._aligned(view) else \
                self._bounce_read(fd, view)
        finally:
            self._leave()
        self.pos += n
        return n

    def fsync(self) -> None:
        fd = self._enter()
        try:
            os.fsync(fd)
        finally:
            self._leave()

    def ioctl(self, request: int, what: str) -> None:
        fd = self._enter()
        try:
            _ioctl_quietly(fd, request, what)
        finally:
            self._leave()

    def fadvise_dontneed(self) -> None:
        fd = self._enter()
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            self._leave()

    def close(self) -> None:
        """Let the drive go now; free the descriptor once no call of another thread uses it."""
        with self._lock:
            if self.fd < 0 or self._closing:
                return
            if self._busy == 0:
                self._close_now()
                return
            self._closing = True
            park_on_devnull(self.fd, self._plain)  # drops the drive, keeps the numbers taken

    def _close_now(self) -> None:
        fd, self.fd = self.fd, -1
        plain, self._plain = self._plain, -1
        close_within(tuple(n for n in (plain, fd) if n is not None and n >= 0))

    def release(self) -> None:
        """Kept for callers of the first API: closing already frees the descriptor."""

    def __enter__(self) -> BlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Unaligned requests.
    def _span(self, length: int) -> tuple[int, int]:
        start = self.pos - self.pos % self.block
        end = -(-(self.pos + length) // self.block) * self.block
        return start, end

    def _bounce_buffer(self, size: int) -> memoryview:
        if self._bounce is None or len(self._bounce) < size:
            self._bounce = memoryview(aligned_buffer(size))
        return self._bounce[:size]

    def _bounce_read(self, fd: int, view: memoryview) -> int:
        start, end = self._span(len(view))
        buf = self._bounce_buffer(end - start)
        got = os.preadv(fd, [buf], start)
        skip = self.pos - start
        n = max(0, min(len(view), got - skip))
        view[:n] = buf[skip : skip + n]
        return n

    def _bounce_write(self, fd: int, view: memoryview) -> int:
        # Only the unaligned tail of a chunk comes here, so one block-sized span is typical.
        length = min(len(view), 1 << 20)
        view = view[:length]
        start, end = self._span(length)
        buf = self._bounce_buffer(end - start)
        got = os.preadv(fd, [buf], start)
        if got < len(buf):
            buf[got:] = bytes(len(buf) - got)
        skip = self.pos - start
        buf[skip : skip + length] = view
        written = os.pwrite(fd, buf, start)
        if written < len(buf):
            return max(0, written - skip)
        return length


def _memory_aligned(view: memoryview, alignment: int) -> bool:
    """True when O_DIRECT may use the view's memory as it is.

    The address of a read-only buffer (``bytes``) cannot be taken, so it is never assumed to
    be aligned: it goes through the bounce buffer instead of failing with EINVAL.
    """
    return not view.readonly and address_of(view) % alignment == 0


def _ioctl_quietly(fd: int, request: int, what: str) -> None:
    """Run an ioctl that only matters on real block devices; skip it where unsupported."""
    try:
        fcntl.ioctl(fd, request, 0)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.ENOSYS, errno.EBUSY, errno.EACCES):
            log.debug("%s not done: %s", what, exc)
        else:
            raise


def open_fd(path: str, flags: int) -> int:
    """open(2), or, for a user the kernel refuses, the same open done by udisks2 (polkit decides).

    Root, and a user already allowed (group ``disk``), open the device themselves.  Anyone else
    goes through udisks2's Block.OpenDevice with the same flags; without udisks2 the error is
    one line saying what to do (:data:`popsicle_py.udisks.NEEDS_ROOT`).
    """
    try:
        return os.open(path, flags)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM) or os.geteuid() == 0:
            raise
    from popsicle_py import udisks  # only users without access need D-Bus at all

    try:
        udisks.client()
    except udisks.Unavailable as exc:  # not installed, hung, or the bus gone since
        line = udisks.unavailable_words(exc, writing=bool(flags & os.O_ACCMODE))
        raise udisks.UdisksError(errno.EACCES, line) from None
    access = flags & os.O_ACCMODE
    mode = {os.O_RDONLY: "r", os.O_WRONLY: "w", os.O_RDWR: "rw"}[access]
    fd = udisks.open_device(path, mode, flags & ~(os.O_ACCMODE | os.O_CLOEXEC))
    os.set_inheritable(fd, False)
    return fd


def open_for_writing(spec: OpenSpec) -> BlockDevice:
    """Open a drive O_RDWR|O_DIRECT|O_SYNC|O_EXCL; fall back to buffered I/O if O_DIRECT is refused.

    Raises OSError; :func:`describe_error` turns it into the user's language.
    """
    try:
        fd = open_fd(spec.path, WRITE_FLAGS | os.O_DIRECT)
        direct = True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        log.debug("%s refuses O_DIRECT; using buffered I/O with fsync", spec.path)
        fd = open_fd(spec.path, WRITE_FLAGS)
        direct = False
    return BlockDevice(fd, spec, direct)


def open_for_reading(spec: OpenSpec) -> BlockDevice:
    """Open a drive to read it back from the device (O_DIRECT where possible)."""
    try:
        fd = open_fd(spec.path, READ_FLAGS | os.O_DIRECT)
        direct = True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        fd = open_fd(spec.path, READ_FLAGS)
        direct = False
    device = BlockDevice(fd, spec, direct)
    if not direct:
        drop_cache(device)
    return device


def drop_cache(device: FileLike) -> None:
    """Forget the drive's cached pages so that reading it back reaches the device.

    Every destination with a descriptor will do (a BlockDevice, a file); others are skipped.
    """
    if isinstance(device, BlockDevice):
        device.ioctl(BLKFLSBUF, "BLKFLSBUF")
        try:
            device.fadvise_dontneed()
        except OSError as exc:
            log.debug("fadvise DONTNEED not done: %s", exc)
        return
    try:
        fd = device.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        log.debug("fadvise DONTNEED not done: %s", exc)


def reread_partitions(path: str) -> None:
    """Ask the kernel to read the new partition table (after our exclusive handle is closed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("BLKRRPART not done: %s", exc)
        return
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            _ioctl_quietly(fd, BLKRRPART, "BLKRRPART")
    except OSError as exc:  # a drive pulled right after it was done: nothing to re-read
        log.debug("BLKRRPART not done: %s", exc)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# The loops over those calls: every destination (a BlockDevice or any file-like) goes through them.


def as_oserror(exc: BaseException) -> OSError:
    """Every destination failure is reported as an OSError, as the engine's API promises."""
    if isinstance(exc, OSError):
        return exc
    wrapped = OSError(errno.EIO, f"{type(exc).__name__}: {exc}")
    wrapped.__cause__ = exc
    return wrapped


def seek(dest: FileLike, offset: int) -> None:
    if hasattr(dest, "seek"):
        dest.seek(offset)


def write_all(
    dest: FileLike,
    view: memoryview,
    *,
    offset: int | None = None,
    stop: Callable[[], bool] | threading.Event | None = None,
    progress: Callable[[int], None] | None = None,
    retries: int = DEFAULT_RETRIES,
    pacer: Pacer | None = None,
) -> int:
    """Write all of ``view`` in paced calls, completing short writes; a write of 0 is an error.

    Transient errors are retried with a growing pause (seeking back first when ``offset``
    says where the data belongs).  Returns the bytes written; stops early, without error,
    when ``stop`` says so.  ``progress(n)`` follows every call that wrote ``n`` bytes.
    """
    stopped = _stop_check(stop)
    pacer = pacer or Pacer(MAX_CALL)
    done = 0
    total = len(view)
    attempt = 0
    while done < total:
        if stopped():
            return done
        chunk = view[done : done + pacer.size()]
        began = time.monotonic()
        try:
            if offset is not None and attempt:
                seek(dest, offset + done)
            n = dest.write(chunk)
        except (io.UnsupportedOperation, ValueError) as exc:
            raise as_oserror(exc) from exc
        except OSError as exc:
            if exc.errno in TRANSIENT and attempt < retries:
                attempt += 1
                _pause(RETRY_BACKOFF * (2 ** (attempt - 1)), stop)
                continue
            raise
        if n is None:  # file-likes that return nothing wrote everything
            n = len(chunk)
        if n <= 0:
            raise OSError(errno.EIO, "the destination accepted 0 bytes (full or gone?)")
        pacer.record(n, time.monotonic() - began)
        attempt = 0
        done += n
        if progress is not None:
            progress(n)
    return done


def _stop_check(stop: Callable[[], bool] | threading.Event | None) -> Callable[[], bool]:
    if stop is None:
        return lambda: False
    if isinstance(stop, threading.Event):
        return stop.is_set
    return stop


def _pause(seconds: float, stop: Callable[[], bool] | threading.Event | None) -> None:
    if isinstance(stop, threading.Event):
        stop.wait(seconds)
    else:
        time.sleep(seconds)


def read_full(source: FileLike, view: memoryview, *, pacer: Pacer | None = None,
              progress: Callable[[int], None] | None = None,
              stop: Callable[[], bool] | None = None) -> int:
    """Fill ``view`` from ``source`` until it is full or the source ends (paced when asked);
    with ``stop``, no further call is made once it says so (the count is then short)."""
    done = 0
    readinto = getattr(source, "readinto", None)
    while done < len(view) and not (stop is not None and stop()):
        want = view[done:] if pacer is None else view[done : done + pacer.size()]
        began = time.monotonic()
        if readinto is not None:
            n = readinto(want)
        else:
            data = source.read(len(want))
            n = len(data)
            view[done : done + n] = data
        if not n:
            break
        if pacer is not None:
            pacer.record(n, time.monotonic() - began)
        done += n
        if progress is not None:
            progress(n)
    return done


def write_at(dest: FileLike, offset: int, data: memoryview, *,
             stop: Callable[[], bool] | threading.Event | None = None,
             progress: Callable[[int], None] | None = None, retries: int = DEFAULT_RETRIES,
             pacer: Pacer | None = None) -> int:
    """Write ``data`` at ``offset`` (see :func:`write_all` for the keywords)."""
    seek(dest, offset)
    return write_all(dest, data, offset=offset, stop=stop, progress=progress, retries=retries,
                     pacer=pacer)


def read_at(dest: FileLike, offset: int, view: memoryview, *,
            pacer: Pacer | None = None) -> int:
    """Read into ``view`` from ``offset``; short only where the destination ends."""
    seek(dest, offset)
    return read_full(dest, view, pacer=pacer)


def holds(dest: FileLike, offset: int, data: memoryview, scratch: memoryview) -> bool:
    """Whether ``dest`` already holds ``data`` at ``offset`` (``scratch``: an aligned buffer)."""
    mine = scratch[: len(data)]
    got = read_at(dest, offset, mine)
    return got == len(data) and xxhash.xxh3_128_digest(mine) == xxhash.xxh3_128_digest(data)


def sync(dest: FileLike) -> None:
    """Flush Python's buffer and the kernel's; EINVAL means the file cannot be synced."""
    flush = getattr(dest, "flush", None)
    if flush is not None:
        flush()
    try:
        if isinstance(dest, BlockDevice):
            dest.fsync()
            return
        fd = dest.fileno()
    except (AttributeError, io.UnsupportedOperation, ValueError):
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EROFS, errno.ENOTSUP):
            raise
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EROFS, errno.ENOTSUP):
            raise


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
