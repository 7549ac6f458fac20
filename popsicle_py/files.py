"""Opening the files the tool writes: regular files only, never through a symbolic link.

A report named ``x.csv`` that is a symlink to /dev/sdb (or a device node, a FIFO...) would
append text to a disk nobody named or confirmed; a planted link in a cache directory would
overwrite whatever it points at.  Every file popsicle-py writes is opened here: O_NOFOLLOW
(a symlink as the last component fails with ELOOP), O_NONBLOCK and O_NOCTTY (a FIFO or a
terminal neither blocks nor becomes ours), then ``fstat`` on the opened descriptor must say
regular file, which no rename between a check and the open can change.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from typing import BinaryIO

_KINDS = ((stat.S_ISBLK, "a block device"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


class NotRegular(OSError):
    """The path is a symlink or not a regular file; ``str()`` says which, in a few words."""

    def __str__(self) -> str:
        return self.strerror or "not a regular file"


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike[str], flags: int, mode: int = 0o644) -> int:
    """``os.open`` for writing a regular file (new, or existing and regular); a descriptor.

    ``flags`` are the usual ones (O_WRONLY | O_APPEND | O_CREAT...).  Raises
    :class:`NotRegular` for a symlink or anything but a regular file, OSError otherwise.
    """
    extra = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | extra, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            raise NotRegular(errno.ELOOP, "is a symbolic link; name the file itself") from None
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads (O_NONBLOCK)
            raise NotRegular(errno.ENXIO, "is a pipe, not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(errno.EINVAL, f"is {_kind(st.st_mode)}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_regular(path: str | os.PathLike[str], *, exclusive: bool = False,
                   mode: int = 0o644) -> BinaryIO:
    """A binary file object for a new (or emptied, unless ``exclusive``) regular file."""
    fd = open_regular(path, os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else 0), mode)
    try:
        if not exclusive:
            os.ftruncate(fd, 0)  # only now that it is known to be a regular file
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, for a small file read at the
    start (a token, a slot map): a FIFO named there would hold the start for ever, and
    /dev/zero would fill memory.  A symlink to a regular file is read (nothing is written).

    Raises :class:`NotRegular` for anything but a regular file, :class:`TooLarge` beyond
    ``limit``, OSError otherwise.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(errno.EINVAL, f"is {_kind(st.st_mode)}, not a regular file")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        size = 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise TooLarge(errno.EFBIG, f"is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


class TooLarge(OSError):
    """A file read whole is larger than it can be; ``str()`` says so in a few words."""

    def __str__(self) -> str:
        return self.strerror or "too large"


def check_regular(path: str | os.PathLike[str], *, create: bool,
                  sidecars: tuple[str, ...] = (), write: bool = True) -> None:
    """For a file another library opens by name (SQLite): it, and every ``path + suffix``
    that exists, must be a regular file and no symlink; with ``create``, it is created.
    ``write=False`` for a file only read: one the user may read but not write passes.

    The library opens the name again afterwards: this refuses a wrong name (a link to a disk
    typed or planted where the journal goes), not a race inside a directory we own.
    """
    access = os.O_RDWR if write else os.O_RDONLY
    os.close(open_regular(path, access | (os.O_CREAT if create else 0), 0o644))
    for suffix in sidecars:
        side = f"{os.fspath(path)}{suffix}"
        try:
            st = os.lstat(side)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            raise NotRegular(errno.ELOOP, f"{side} is a symbolic link")
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(errno.EINVAL, f"{side} is {_kind(st.st_mode)}, not a regular file")


def park_on_devnull(*fds: int | None) -> None:
    """Point each open descriptor at /dev/null, atomically: the file it held is let go, and
    its number stays taken, so a call another thread is making with it cannot reach the file
    the next open would get that number for (closed later, by whoever uses it last)."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for fd in fds:
            if fd is not None and fd >= 0:
                os.dup2(null, fd)
    finally:
        os.close(null)


def silence_hung_up_terminal(fds: tuple[int, ...] = (1, 2)) -> None:
    """Point each of ``fds`` that is a terminal gone away (an ssh connection dropped, a window
    closed) at /dev/null: the rest of the output, and Python's own flush at exit (a failed one
    is exit status 120), then go nowhere rather than fail.  Such a terminal fails every write
    with EIO, one of no bytes too (it no longer answers isatty); another file takes that as a
    write of nothing."""
    gone = []
    for fd in fds:
        try:
            os.write(fd, b"")
        except OSError as exc:
            if exc.errno == errno.EIO:
                gone.append(fd)
    park_on_devnull(*gone)


#: How long closing a drive is waited for before the run goes on without it (see below).
CLOSE_WAIT = 2.0


def close_within(fds: tuple[int, ...], limit: float = CLOSE_WAIT) -> None:
    """Close ``fds`` on a thread of their own, waited for ``limit`` seconds at most.

    The last close of a block device takes its disk's open mutex, which any process's
    ``sync`` holds while the disk's writeback drains: a stick that hangs with pages still to
    write (mcopy's boot files) held the closing thread, and the summary behind it, until the
    kernel gave the stick up.  The numbers are free at once (the kernel drops them before the
    release); the process exits once the release returns.  A close that failed in time raises.
    """
    from popsicle_py.signals import keep_signals_for_main_thread

    done = threading.Event()
    failed: list[OSError] = []

    def close() -> None:
        keep_signals_for_main_thread()
        for fd in fds:
            try:
                os.close(fd)
            except OSError as exc:
                failed.append(exc)
        done.set()

    threading.Thread(target=close, name="popsicle-close", daemon=True).start()
    if done.wait(limit) and failed:
        raise failed[0]
