"""Identify a slot's drive: read it for a few seconds so that its activity light blinks.

Reads only, spread over the drive with O_DIRECT (the page cache would answer repeated reads
and the light would stay dark), and only from the drive the slot's tile shows: the kernel
gives a /dev name (and its device number) to the next stick at once, so the medium's
identity recorded when the drive came (device number, size, serial, diskseq) is compared
before the request is answered (:func:`gone`), and again on the open file (:func:`read_for`).
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import stat
import time

from popsicle_py.drives import media_identity
from popsicle_py.identity import MediaIdentity, same_media
from popsicle_py.media import identity_of_fd

#: How long a drive is read when a person asks which one it is.
IDENTIFY_SECONDS = 4.0
_BLOCK = 64 << 10


def gone(path: str, expected: MediaIdentity | None) -> str | None:
    """Why ``path`` is not the drive ``expected`` any more (pulled, or its name another
    drive's now), in a few words; None when it still is."""
    if expected is None:
        return "it was not examined when it came"
    try:
        now = media_identity(path)
    except OSError:
        return f"nothing answers as {path} now"
    why = same_media(expected, now)
    return None if why is None else f"{path} is another drive now ({why})"


def read_for(path: str, expected: MediaIdentity | None,
             seconds: float = IDENTIFY_SECONDS) -> int:
    """Read ``path`` at random aligned offsets for ``seconds``; the bytes read.

    Raises OSError when it cannot be opened or holds another medium than ``expected`` now.
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
        if expected is not None and stat.S_ISBLK(st.st_mode):
            why = same_media(expected, identity_of_fd(fd, path))
            if why is not None:
                raise OSError(f"{path} is another drive now ({why})")
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
