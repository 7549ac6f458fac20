"""Identify a slot's drive: read it for a few seconds so that its activity light blinks.

Reads only, spread over the drive with O_DIRECT (the page cache would answer repeated reads
and the light would stay dark), and only from the drive the station saw in that slot: the
device number is checked on the open file, so a stick swapped in meanwhile is never read.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import stat
import time

#: How long a drive is read when a person asks which one it is.
IDENTIFY_SECONDS = 4.0
_BLOCK = 64 << 10


def read_for(path: str, devnum: int | None, seconds: float = IDENTIFY_SECONDS) -> int:
    """Read ``path`` at random aligned offsets for ``seconds``; the bytes read.

    Raises OSError when it cannot be opened or is another drive than ``devnum`` now.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_DIRECT)
    except OSError as exc:  # a file system without O_DIRECT (a test bed's plain file)
        if exc.errno != errno.EINVAL:
            raise
        fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if devnum is not None and stat.S_ISBLK(st.st_mode) and st.st_rdev != devnum:
            raise OSError(f"{path} is another drive now")
        size = os.lseek(fd, 0, os.SEEK_END)
        blocks = max(size // _BLOCK, 1)
        buf = mmap.mmap(-1, _BLOCK)  # page-aligned, as O_DIRECT wants
        done = 0
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                done += os.preadv(fd, [buf], random.randrange(blocks) * _BLOCK)
        finally:
            buf.close()
        return done
    finally:
        os.close(fd)
