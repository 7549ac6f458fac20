"""Block devices opened for real I/O: O_DIRECT with aligned buffers, O_SYNC, O_EXCL.

:class:`BlockDevice` is a small file-like object the engine writes to and reads from.  It keeps
its own position and uses positional system calls (which release the GIL).  Requests that are
not aligned to the logical block size (the last bytes of an image whose size is not a multiple
of it) go through a one-block bounce buffer: the block is read, the image's bytes are laid over
it and the block is written back, so nothing past the image's end changes.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from dataclasses import dataclass

from popsicle_py.buffers import address_of, aligned_buffer

log = logging.getLogger(__name__)

BLKFLSBUF = 0x1261
BLKRRPART = 0x125F
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268

WRITE_FLAGS = os.O_RDWR | os.O_SYNC | os.O_EXCL | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC


@dataclass(frozen=True)
class OpenSpec:
    """What opening needs to know of a drive (a :class:`~popsicle_py.drives.Drive` has it)."""

    path: str
    size: int
    logical_block_size: int = 512
    read_only: bool = False


class BlockDevice:
    """A drive opened for whole-device I/O, positioned like a file."""

    def __init__(self, fd: int, spec: OpenSpec, direct: bool) -> None:
        self.fd = fd
        self.path = spec.path
        self.size = spec.size
        self.block = max(512, spec.logical_block_size)
        self.direct = direct
        self.read_only = spec.read_only
        self.pos = 0
        self._bounce: memoryview | None = None
        self._parked = -1

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
        """Nothing is buffered in Python; fsync is the engine's job."""

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
                raise OSError(errno.ENOSPC, "image is larger than the drive")
            view = view[: self.size - self.pos]
        if not view:
            return 0
        view = self._aligned_prefix(view)
        n = os.pwrite(self.fd, view, self.pos) if self._aligned(view) else self._bounce_write(view)
        self.pos += n
        return n

    def readinto(self, buffer: memoryview | bytearray) -> int:
        view = memoryview(buffer).cast("B")
        if self.size:
            view = view[: max(0, self.size - self.pos)]
        if not view:
            return 0
        view = self._aligned_prefix(view)
        n = os.preadv(self.fd, [view], self.pos) if self._aligned(view) else self._bounce_read(view)
        self.pos += n
        return n

    def close(self) -> None:
        """Release the drive; the descriptor's number stays taken (on /dev/null).

        A thread abandoned in a write (a stalled drive, a cancel) may still issue one more
        write with the number it holds.  Closed for real, that number could by then belong to
        another drive opened since; parked on /dev/null, such a write goes nowhere.
        """
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.dup2(null, fd)  # atomically drops the drive and keeps the number
        finally:
            os.close(null)
        self._parked = fd

    def release(self) -> None:
        """Free the parked descriptor once no thread can be using it any more."""
        fd, self._parked = self._parked, -1
        if fd >= 0:
            os.close(fd)

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

    def _bounce_read(self, view: memoryview) -> int:
        start, end = self._span(len(view))
        buf = self._bounce_buffer(end - start)
        got = os.preadv(self.fd, [buf], start)
        skip = self.pos - start
        n = max(0, min(len(view), got - skip))
        view[:n] = buf[skip : skip + n]
        return n

    def _bounce_write(self, view: memoryview) -> int:
        # Only the unaligned tail of a chunk comes here, so one block-sized span is typical.
        length = min(len(view), 1 << 20)
        view = view[:length]
        start, end = self._span(length)
        buf = self._bounce_buffer(end - start)
        got = os.preadv(self.fd, [buf], start)
        if got < len(buf):
            buf[got:] = bytes(len(buf) - got)
        skip = self.pos - start
        buf[skip : skip + length] = view
        written = os.pwrite(self.fd, buf, start)
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
    except udisks.Unavailable:
        raise udisks.UdisksError(errno.EACCES, udisks.NEEDS_ROOT) from None
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


def drop_cache(device: BlockDevice) -> None:
    """Forget the drive's cached pages so that reading it back reaches the device."""
    _ioctl_quietly(device.fd, BLKFLSBUF, "BLKFLSBUF")
    try:
        os.posix_fadvise(device.fd, 0, 0, os.POSIX_FADV_DONTNEED)
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


def sysfs_read_only(path: str) -> bool:
    """The kernel's own read-only flag for a block device (1 in /sys/dev/block/M:m/ro)."""
    try:
        rdev = os.stat(path).st_rdev
        with open(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/ro") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def describe_error(exc: BaseException, path: str) -> str:
    """One line in the user's language: which drive, what happened, what to do."""
    line = getattr(exc, "line", None)
    if isinstance(line, str):  # already said in the user's language (udisks, polkit)
        return line
    code = getattr(exc, "errno", None)
    detail = getattr(exc, "strerror", None) or str(exc)
    if code == errno.EACCES:
        return f"{path}: permission denied; run as root (or with sudo)"
    if code == errno.EROFS or (code == errno.EPERM and sysfs_read_only(path)):
        return f"{path}: the drive is write-protected (read-only)"
    if code == errno.EPERM:
        return f"{path}: operation not permitted; run as root (or with sudo)"
    if code == errno.EBUSY:
        return (f"{path}: the drive is busy (mounted, or opened exclusively by another "
                "program); unmount it or use --unmount")
    if code == errno.ENOMEDIUM:
        return f"{path}: no card in the reader"
    if code in (errno.ENODEV, errno.ENXIO):
        return f"{path}: the drive was removed"
    if code == errno.ENOSPC:
        if "larger" in detail:
            return f"{path}: {detail}"
        return f"{path}: no space left on the drive (it failed, or is smaller than it claims)"
    if code == errno.EIO:
        return f"{path}: I/O error: {detail} (the drive may be failing)"
    if code == errno.ENOENT:
        return f"{path}: does not exist"
    return f"{path}: {detail}"
