"""Why a drive failed, in the words a person reads and as a :class:`~popsicle_py.events.Cause`.

The one place where failures are worded, advice included (``--unmount`` for a mounted drive), so
the I/O layer below only raises: a failure is typed where it arises (:class:`~.errors.TooSmall`,
:class:`~.errors.Stalled`, :class:`~.errors.Counterfeit`, a changed medium, the source's own
errors) and its cause is read off its type in :data:`BY_TYPE`.  Failures the kernel reports come
as plain ``OSError`` and are told apart by errno, with what the system says about the drive now
(pulled, write-protected, mounted).  Above blockdev: it asks :mod:`popsicle_py.drives` for mount
points.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Sequence

from popsicle_py import drives, sysfs
from popsicle_py.blockdev import MediaChanged
from popsicle_py.errors import (
    ChecksumMismatch,
    Counterfeit,
    ExtentChecksumError,
    Rejected,
    SourceChanged,
    SourceDiffers,
    SourceStalled,
    SourceUnreadable,
    Stalled,
    TooSmall,
)
from popsicle_py.events import Cause
from popsicle_py.records import record
from popsicle_py.units import format_size


@record
class Failure:
    """Why a drive failed: a typed cause for programs, one line for people."""

    cause: Cause
    text: str


def _own_line(exc: BaseException, path: str) -> str:
    return str(exc)


def _on_drive(exc: BaseException, path: str) -> str:
    return f"{path}: {getattr(exc, 'strerror', None) or exc}"


#: Failures whose type says what happened, whatever state the drive is in now: the cause and how
#: the line is made (first match wins; a subclass before its base).
BY_TYPE: tuple[tuple[type[BaseException], Cause, Callable[[BaseException, str], str]], ...] = (
    (MediaChanged, Cause.CHANGED, _own_line),
    (Counterfeit, Cause.COUNTERFEIT, _on_drive),
    # The image's fault, not the drive's.
    (SourceChanged, Cause.SOURCE, _on_drive),
    (SourceDiffers, Cause.SOURCE, _on_drive),
    (SourceStalled, Cause.SOURCE, _on_drive),
    (SourceUnreadable, Cause.SOURCE, _on_drive),
    (ChecksumMismatch, Cause.SOURCE, _on_drive),
    (ExtentChecksumError, Cause.SOURCE, _on_drive),
    (Stalled, Cause.STALLED, _on_drive),
)

#: Failures that a pulled drive ends in too: when the drive is gone, that is what happened.
UNLESS_REMOVED: tuple[tuple[type[BaseException], Cause, Callable[[BaseException, str], str]],
                      ...] = (
    (TooSmall, Cause.TOO_SMALL, _on_drive),
)


#: The cause of a failure udisks2 worded, by its errno: only polkit's refusals are about
#: permission (a hung or vanished udisks2, the bus gone, are not).
_WORDED = {errno.EACCES: Cause.PERMISSION, errno.EBUSY: Cause.BUSY, errno.EINTR: Cause.CANCELLED,
           errno.ENXIO: Cause.CHANGED, errno.ENODEV: Cause.NOT_FOUND}


def failure(exc: BaseException, path: str) -> Failure:
    """One line in the user's language (which drive, what happened, what to do), and its cause."""
    line = getattr(exc, "line", None)
    if isinstance(line, str):  # already said in the user's language (udisks, polkit)
        return Failure(_WORDED.get(getattr(exc, "errno", 0) or 0, Cause.ERROR), line)
    if isinstance(exc, Rejected):  # graded out: the cause is the grade's
        return Failure(Cause(exc.cause), _on_drive(exc, path))
    for kind, cause, words in BY_TYPE:
        if isinstance(exc, kind):
            return Failure(cause, words(exc, path))
    code = getattr(exc, "errno", None)
    detail = getattr(exc, "strerror", None) or str(exc)
    if code == errno.EACCES:
        return Failure(Cause.PERMISSION, f"{path}: permission denied; run as root (or with sudo)")
    if code == errno.EROFS or (code == errno.EPERM and sysfs_read_only(path)):
        return Failure(Cause.READ_ONLY, f"{path}: the drive is write-protected (read-only)")
    if code == errno.EPERM:
        return Failure(Cause.PERMISSION,
                       f"{path}: operation not permitted; run as root (or with sudo)")
    if code == errno.EBUSY:
        return Failure(Cause.BUSY, busy_message(path, _mountpoints(path)))
    if code == errno.ENOMEDIUM:
        return Failure(Cause.NO_MEDIUM, f"{path}: no card in the reader")
    if code in (errno.ENODEV, errno.ENXIO) or (code in (errno.ENOSPC, errno.EIO)
                                                and drive_gone(path)):
        # A pulled stick's writes end in EIO (retried for seconds first, while the kernel drops
        # the disk) or, once its capacity reads 0, ENOSPC: it is simply gone.
        return Failure(Cause.REMOVED, f"{path}: the drive was removed")
    for kind, cause, words in UNLESS_REMOVED:
        if isinstance(exc, kind):
            return Failure(cause, words(exc, path))
    if code == errno.ENOSPC:
        return Failure(Cause.NO_SPACE, f"{path}: no space left on the drive (it failed, or is "
                       "smaller than it claims)")
    if code == errno.EIO:
        return Failure(Cause.IO_ERROR, f"{path}: I/O error: {detail} (the drive may be failing)")
    if code == errno.ENOENT:
        return Failure(Cause.NOT_FOUND, f"{path}: does not exist")
    return Failure(Cause.ERROR, f"{path}: {detail}")


def hung_call(path: str) -> str:
    """The note for a drive whose last read or write has not returned (hung in the kernel):
    the summary comes now, but the process can only end once the kernel gives that call up."""
    return (f"{path}: a read or write to this drive has not returned; popsicle-py exits once "
            "it does: when the drive completes it at its present speed, or the kernel gives up "
            "on it (about 30 s per try for a USB stick)")


def hung_check(path: str, what: str) -> str:
    """The note for Ctrl-C while a check of ``path`` (OUTPUT's directory, the image) waits on
    its hung file system: nothing was written, but the process ends only once that call does."""
    return (f"{path}: {what} has not returned; popsicle-py exits once it does (when the disk "
            "or share it is on answers again)")


def hung_output(folder: str, publishing: str | None = None) -> str:
    """The note for an OUTPUT whose file system stopped answering while a write or another
    call to it was under way: the process can only end once that call returns.  While the
    finished files were being given their names (``publishing``: OUTPUT), the process ends
    as that call returns, and what it named by then stays."""
    said = (f"{folder}: a write or other call to this directory has not returned; "
            "popsicle-py exits once it does (when its file system answers again)")
    if publishing is None:
        return f"{said}, and its partial files are removed then"
    return (f"{said}; the read was whole and its files were being named: {publishing} and "
            "its .sha256 may then stand (check them with sha256sum -c), or their temporary "
            "files")


def describe_error(exc: BaseException, path: str) -> str:
    """:func:`failure`'s line alone."""
    return failure(exc, path).text


def busy_message(path: str, mountpoints: Sequence[str]) -> str:
    """Why opening ``path`` exclusively failed, and what helps: --unmount only when mounted."""
    if mountpoints:
        return (f"{path}: the drive is busy: mounted at {', '.join(mountpoints)}; unmount it "
                "or use --unmount")
    return (f"{path}: the drive is busy: in exclusive use by a program (see which with "
            f"`fuser -v {path}*`) or by the kernel (a file system on it unmounted with "
            "`umount -l` while in use, a loop device over a file on it); close it and try again")


def _mountpoints(path: str) -> tuple[str, ...]:
    try:
        devnum = os.stat(path).st_rdev
    except OSError:
        return ()
    return drives.mountpoints_of(devnum, drives.current_mounts())


def drive_gone(path: str) -> bool:
    """Whether the kernel has let go of the block device at ``path``.

    True when the node, or its sysfs directory, is gone, or its size reads 0: what a USB stick
    shows from the moment it is pulled until udev removes its node.  Without sysfs at all (a
    container) nothing is known, and nothing is called removed.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if not stat.S_ISBLK(st.st_mode):
        return False
    size = sysfs.attr(st.st_rdev, "size")
    if size is None:
        return os.path.isdir(os.path.dirname(sysfs.block_dir(st.st_rdev)))
    return size == "0"


def sysfs_read_only(path: str) -> bool:
    """The kernel's own read-only flag for a block device (1 in /sys/dev/block/M:m/ro)."""
    try:
        rdev = os.stat(path).st_rdev
    except OSError:
        return False
    return sysfs.attr(rdev, "ro") == "1"


def head_undone(length: int, done: bool) -> str:
    """What a failed or cancelled drive's result adds once its head had begun to be written."""
    size = format_size(length)
    if done:
        return f"the image's first {size} were overwritten again"
    return (f"the image's first {size} could not be overwritten again: the drive may look like "
            "the image; do not use it")


def call_not_returned(path: str, device: object) -> str | None:
    """The note for a drive whose last read or write has not returned (hung in the kernel),
    or None: the summary comes now, but the process can only end once that call does."""
    return hung_call(path) if getattr(device, "in_call", False) else None
