"""The spill file: a decompressed stream, kept on disk once, so laggards can read it by position.

A decompressor cannot be rewound, so without it every drive of a compressed image would be held
to the slowest one's pace.  The reader appends each bucket it decodes; a lane that fell a ring
behind leaves the ring and reads the spill with ``os.preadv``, exactly as laggards of a raw image
read the image file.  The file lives in a private directory (mode 0700) under ``$TMPDIR``
(default ``/var/tmp``, which is on disk, unlike a RAM-backed ``/tmp``) and is unlinked as soon
as it is opened: nothing is left behind, not even after ``kill -9``, and the space is freed
when the run closes it.

The whole file is kept until the end of the run, not only what laggards still need: repairs of
bad buckets and the exact offset of a mismatch then come from it by position instead of from a
second decompression.

When there is no room (checked against the decompressed size when the format records it, and
against a margin of free space before every bucket), spilling stops: lanes already on their own
read what was spilled and then rejoin the ring where the spill ends, and no other lane leaves
the ring; every drive goes on, in lock-step.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading

from popsicle_py.files import park_on_devnull

#: Free space the spill always leaves on its filesystem (full filesystems misbehave).
MARGIN = 256 << 20


def default_dir() -> str:
    """$TMPDIR, else /var/tmp (on disk: /tmp is often RAM), else the system's temporary dir."""
    return os.environ.get("TMPDIR") or ("/var/tmp" if os.path.isdir("/var/tmp")
                                        else tempfile.gettempdir())


class Spill:
    """An unlinked file the reader appends to and laggards read by position."""

    def __init__(self, fd: int, directory: str) -> None:
        self.fd = fd
        self.directory = directory
        self.end = 0  # bytes spilled so far, from offset 0, all of them complete
        self.stopped: str | None = None  # why spilling stopped, once it has
        self._lock = threading.Lock()
        self._busy = 0  # appends under way (the reader's, perhaps abandoned by the run)
        self._closing = False

    @classmethod
    def create(cls, parent: str | None, size: int | None) -> Spill | str:
        """A new spill, or why there cannot be one (no room for ``size`` bytes, no directory)."""
        parent = parent or default_dir()
        try:
            free = shutil.disk_usage(parent).free
        except OSError as exc:
            return f"{parent}: {exc.strerror or exc}"
        if size is not None and size + MARGIN > free:
            return (f"not enough room in {parent} for the decompressed image "
                    f"({size >> 20} MiB needed, {free >> 20} MiB free)")
        try:
            directory = tempfile.mkdtemp(prefix="popsicle-py-spill-", dir=parent)  # 0700
            path = os.path.join(directory, "image.raw")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.unlink(path)
            os.rmdir(directory)
        except OSError as exc:
            return f"{parent}: {exc.strerror or exc}"
        return cls(fd, parent)

    def append(self, offset: int, data: memoryview) -> bool:
        """Write the bytes at ``offset`` (= ``end``); False once spilling has stopped."""
        with self._lock:
            if self.stopped is not None or self.fd < 0 or self._closing:
                return False
            self._busy += 1
            fd = self.fd
        try:
            if shutil.disk_usage(self.directory).free < len(data) + MARGIN:
                self.stop(f"{self.directory} is nearly full")
                return False
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
        except OSError as exc:
            self.stop(f"{self.directory}: {exc.strerror or exc}")
            return False
        finally:
            with self._lock:
                self._busy -= 1
                if self._busy == 0 and self._closing:
                    self._close_now()
        self.end = offset + len(data)
        return True

    def stop(self, why: str) -> None:
        if self.stopped is None:
            self.stopped = why

    def close(self) -> None:
        """Free the file now; its descriptor's number once no append uses it.

        An append of a reader the run gave up on (a hung decompressor, a hung spill disk)
        may be between reading the number and its write: closed under it, the number could
        be reused by the next open, another stick's say, and the image's bytes written
        there. So it is pointed at /dev/null (atomically: the file goes) and kept taken
        until that append returns."""
        with self._lock:
            if self.fd < 0 or self._closing:
                return
            if self._busy == 0:
                self._close_now()
                return
            self._closing = True
            park_on_devnull(self.fd)

    def _close_now(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
