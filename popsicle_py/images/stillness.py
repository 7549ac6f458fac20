"""An image file must hold still while it is flashed.

A file edited in place (or replaced, truncated) while the reader is part-way through gives
the drives part of the old image and part of the new: each drive then matches what was read,
so the read-back passes, and yet no drive holds either image.  Its state is taken when the
image is opened and compared once it has been read, before any drive gets its head (the
engine's ``vouch``).  A master drive has its own check (:mod:`popsicle_py.master`); a file on
a FUSE or network mount that does not update its times goes unseen here.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from popsicle_py.records import record
from popsicle_py.units import format_size


class ImageChanged(OSError):
    """The image file changed while it was read: no drive holds one image."""

    def __init__(self, path: str, how: str) -> None:
        super().__init__(errno.EIO, f"the image {path} changed while it was read ({how}): "
                         "no drive holds it")
        self.how = how


@record
class FileState:
    """What changes when a file is written or replaced."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


def file_state(path: str) -> FileState | None:
    """The state of the regular file ``path``, None when it is not one (or is gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return FileState(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def change(before: FileState, now: FileState | None) -> str | None:
    """How the file changed, in a few words, or None (pure)."""
    if now is None:
        return "it is gone"
    if (now.dev, now.ino) != (before.dev, before.ino):
        return "another file took its name"
    if now.size != before.size:
        return f"its size went from {format_size(before.size)} to {format_size(now.size)}"
    if now.mtime_ns != before.mtime_ns:
        return "it was written to"
    if now.ctime_ns != before.ctime_ns:  # chmod, a link, or a write whose time was set back
        return "its inode changed: written to with its time set back, or its mode or links"
    return None


def holding_still(path: str) -> Callable[[], None] | None:
    """A check raising :class:`ImageChanged` if the file ``path`` changes from now on; None
    when it is not a regular file (a download, a pipe, a drive)."""
    before = file_state(path)
    if before is None:
        return None

    def check() -> None:
        how = change(before, file_state(path))
        if how is not None:
            raise ImageChanged(path, how)

    return check
