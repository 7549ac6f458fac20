"""Standard input as the image (``-``): read once, its size unknown, decoded by its magic.

``xzcat disk.img.xz | popsicle-py flash - /dev/sdb`` writes the stream as it comes; the
drives are verified from the digests the write pass recorded (the stream cannot be read a
second time), and a checksum given for it is taken over the bytes as they pass.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from typing import Any

from popsicle_py.images.checksums import Checksum, ChecksumTap, new_hasher
from popsicle_py.images.files import READ_SIZE, ImageError
from popsicle_py.images.formats import HEAD_SIZE, Format, by_name, judge, lacks_check
from popsicle_py.images.image import Replay, open_stream, read_full
from popsicle_py.images.sample import Sample, runnable, take_sample

__all__ = ["StdinImage", "open_stdin"]

SHOWN = "standard input"


class _Checked(io.RawIOBase):
    """Hashes the bytes as they pass and refuses the end of the stream when they differ."""

    def __init__(self, raw: io.RawIOBase, checksum: Checksum) -> None:
        super().__init__()
        self._raw = raw
        self._checksum = checksum
        self._hasher = new_hasher(checksum)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = self._raw.readinto(view) or 0
        self._hasher.update(view[:n])
        if n == 0 and self._hasher.hexdigest() != self._checksum.hexdigest:
            raise ImageError(f"checksum mismatch for {SHOWN}: expected {self._checksum.algo} "
                             f"{self._checksum.hexdigest} (from {self._checksum.source}), got "
                             f"{self._hasher.hexdigest()}")
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class StdinImage:
    """The image read from standard input: one pass only, so nothing is read by position."""

    path = "-"
    size: int | None = None
    file_size = 0
    member = None
    warning = None
    seekable_raw = False
    tappable = True

    def __init__(self, fd: int, head: bytes, kind: Format,
                 checksum: Checksum | None = None, sample: Sample | None = None) -> None:
        self._fd = fd
        self._head = head  # the bytes read already: served again first
        #: The decoded start, judged before any drive is opened (see app/sources.sanity_note).
        self.sample = sample
        self.format = kind.name
        self.checksum = checksum
        #: How the stream lacks an integrity check of its own (formats.lacks_check), or None.
        self.unchecked = lacks_check(kind, head[:HEAD_SIZE])
        self._opened = False

    @property
    def kind(self) -> Format:
        return by_name(self.format)

    @property
    def compressed(self) -> bool:
        return self.kind.decoded

    def _raw(self) -> io.RawIOBase:
        """The bytes as they come, once: a pipe cannot be read from its start again."""
        if self._opened:
            raise ImageError(f"{SHOWN} can be read only once")
        self._opened = True
        rest = open(self._fd, "rb", buffering=0, closefd=False)  # noqa: SIM115 (closed by caller)
        return Replay(self._head, rest)

    def open(self, tap: ChecksumTap | None = None) -> io.RawIOBase:
        """The decoded stream, once (a checksum given is checked as the bytes pass)."""
        raw = self._raw()
        if tap is not None:
            raw = tap.wrap(raw)  # type: ignore[arg-type]
        elif self.checksum is not None:
            raw = _Checked(raw, self.checksum)
        return open_stream(raw, self.format, SHOWN,  # type: ignore[arg-type,return-value]
                           saved=SAVED)

    def save(self, directory: str) -> str:
        """Copy the bytes as they come to a new private file in ``directory`` (``watch``
        writes every drive from a file); its path.  The caller removes it."""
        fd, path = tempfile.mkstemp(prefix="popsicle-py-stdin-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as out, self._raw() as raw:
                stream = raw if self.checksum is None else _Checked(raw, self.checksum)
                while chunk := stream.read(READ_SIZE):
                    out.write(chunk)
        except BaseException as e:
            os.unlink(path)
            if isinstance(e, OSError):
                raise ImageError(f"cannot keep {SHOWN} in {directory}: "
                                 f"{e.strerror or e}") from None
            raise
        return path

    def read_at(self, offset: int, length: int) -> bytes:
        raise ImageError(f"{SHOWN} cannot be read again (to repair byte {offset}): "
                         "save the image to a file to have bad blocks rewritten")


def open_stdin(checksum: Checksum | None = None, fd: int = 0) -> StdinImage:
    """Standard input, its format judged from its first bytes; ImageError for a terminal, an
    empty stream, or a format that cannot be read as a stream (a zip)."""
    if os.isatty(fd):
        raise ImageError("- reads the image from standard input, which is a terminal: pipe "
                         "the image in (e.g. `xzcat disk.img.xz | popsicle-py flash - DEVICE`)")
    try:
        # A pipe left non-blocking by whoever made it answers "nothing yet" (EAGAIN) when its
        # producer pauses: read as the image's end, a part of it would end ok.
        os.set_blocking(fd, True)
        with open(fd, "rb", buffering=0, closefd=False) as f:
            head = read_full(f, HEAD_SIZE)
            if not head:
                raise ImageError(f"{SHOWN} is empty: no image came through the pipe")
            try:
                kind = judge(head, SHOWN)
                if kind.needs_whole_file:
                    raise ImageError(f"{SHOWN} holds a {kind.name} file, which cannot be read "
                                     "as a stream: save it to a file and give its name")
                # Judged like a file before any drive is opened; kept, and written first.
                sample = take_sample(head, _reader(f), kind, SHOWN)
            except ImageError as e:
                raise ImageError(runnable(str(e), SHOWN, SAVED)) from None
    except OSError as e:
        raise ImageError(f"{SHOWN} cannot be read: {e.strerror or e}") from None
    return StdinImage(fd, sample.raw, kind, checksum, sample)


#: What FILE is in advice given for standard input (`lzip -dk FILE`).
SAVED = "what came through standard input, saved to a file"


def _reader(f: io.RawIOBase) -> Callable[[int], bytes | None]:
    """The pipe's further bytes for the sample (a read error: the sample stops there)."""
    def more(n: int) -> bytes | None:
        try:
            return f.read(n) or b""
        except OSError:
            return None
    return more
