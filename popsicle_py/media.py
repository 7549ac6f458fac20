"""Media identity read from the system: an open descriptor (ioctls) or sysfs.

:mod:`popsicle_py.identity` says what a medium's identity is and when two are the same; this
module reads one.  The drive layer reads a loop device's backing when it records a drive
(:func:`loop_key_of_fd`, :func:`loop_key_of_sysfs`), and the block-device layer checks the
descriptor it is about to write (:func:`confirmed`).  Both import this module, and it imports
neither of them: a cycle between those two layers is what it replaces.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from typing import Protocol, TypeVar

from popsicle_py import sysfs
from popsicle_py.identity import LoopKey, MediaIdentity, not_confirmed, same_media

BLKGETSIZE64 = 0x80081272
BLKGETDISKSEQ = 0x80081280  # Linux >= 5.15
LOOP_GET_STATUS64 = 0x4C05
LOOP_MAJOR = 7
#: struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset (u64 each) lead its 232 bytes.
_LOOP_INFO64 = struct.Struct("<QQQQ")
_LOOP_INFO64_SIZE = 232


class MediaChanged(OSError):
    """The opened device is not the medium the user confirmed; its message is the user's line."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENXIO, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Opened(Protocol):
    """What :func:`confirmed` needs of an opened drive (a :class:`~popsicle_py.blockdev.
    BlockDevice` is one): its descriptor and path, and a way to let it go."""

    @property
    def fd(self) -> int: ...

    @property
    def path(self) -> str: ...

    def close(self) -> None: ...

    def release(self) -> None: ...


OpenedT = TypeVar("OpenedT", bound=Opened)

_sysfs = sysfs.attr


def _ioctl_u64(fd: int, request: int) -> int | None:
    buf = bytearray(8)
    try:
        fcntl.ioctl(fd, request, buf)
    except OSError:
        return None
    return int.from_bytes(buf, "little")


def loop_key_of_fd(fd: int) -> LoopKey | None:
    """What the loop device open on ``fd`` stands on (LOOP_GET_STATUS64), None if unbound."""
    buf = bytearray(_LOOP_INFO64_SIZE)
    try:
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
    except OSError:
        return None
    dev, ino, rdev, offset = _LOOP_INFO64.unpack_from(buf)
    return LoopKey(dev, ino, rdev, offset)


def loop_key_of_sysfs(devnum: int) -> LoopKey | None:
    """The same from sysfs (backing_file, offset) and a stat of the backing path.

    Less exact than the ioctl: a backing file renamed or deleted since it was attached cannot
    be found by its name, and then None is returned (which refuses rather than guesses).
    """
    backing = _sysfs(devnum, "loop/backing_file")
    offset = _sysfs(devnum, "loop/offset")
    if not backing or offset is None or not offset.isdigit():
        return None
    try:
        st = os.stat(backing)
    except OSError:
        return None
    return LoopKey(st.st_dev, st.st_ino, st.st_rdev if stat.S_ISBLK(st.st_mode) else 0,
                   int(offset))


def identity_of_fd(fd: int, path: str) -> MediaIdentity:
    """The medium behind an open descriptor, read from the descriptor wherever possible.

    Device number from fstat; size from BLKGETSIZE64; diskseq from BLKGETDISKSEQ (Linux >=
    5.15), or else from sysfs ``diskseq`` read now, after the open; a loop device's backing
    from LOOP_GET_STATUS64 (or sysfs).  A descriptor that is not a block device (a umockdev
    testbed's /dev node is a plain file) writes to no drive; it is identified by its path.
    The serial is not known here (None): :func:`popsicle_py.drives.still_same` compares it.
    """
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        devnum = st.st_rdev
        size = _ioctl_u64(fd, BLKGETSIZE64)
        diskseq = _ioctl_u64(fd, BLKGETDISKSEQ)
    else:
        try:
            node = os.stat(path)
            devnum = node.st_rdev if stat.S_ISBLK(node.st_mode) else 0
        except OSError:
            devnum = 0
        size = diskseq = None
    if size is None:
        sectors = _sysfs(devnum, "size")
        size = int(sectors) * 512 if sectors and sectors.isdigit() else 0
    if diskseq is None:
        text = _sysfs(devnum, "diskseq")
        diskseq = int(text) if text and text.isdigit() else None
    is_loop = os.major(devnum) == LOOP_MAJOR
    loop = None
    if is_loop:
        loop = loop_key_of_fd(fd) if stat.S_ISBLK(st.st_mode) else None
        if loop is None and _sysfs(devnum, "loop/backing_file"):
            loop = loop_key_of_sysfs(devnum)
    return MediaIdentity(path, devnum, size, diskseq, None, loop, is_loop)


def confirmed(device: OpenedT, expected: MediaIdentity | None) -> OpenedT:
    """``device`` if it holds the medium the user confirmed, else close it and raise.

    The last check before the first write, made on the descriptor that will be written, so
    nothing can change between it and the write (an opened loop device cannot be re-attached,
    a pulled stick's descriptor only fails).
    """
    if expected is None:
        return device
    why = same_media(expected, identity_of_fd(device.fd, device.path))
    if why is None:
        return device
    device.close()
    device.release()
    raise MediaChanged(not_confirmed(device.path, why))
