"""The first bytes of an image that is read once (standard input, a download), taken up front.

A file that is not a disk image (an error page, a qcow2, a few bytes) is refused from its
decoded head before any drive is opened (:mod:`popsicle_py.sanity`).  A pipe or a download
cannot be read from its start a second time, so its first bytes are read here, decoded as far
as that judgement needs, and kept: the stream that is written serves them again first.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from popsicle_py import sanity
from popsicle_py.images.files import ImageError
from popsicle_py.images.formats import Format, runnable
from popsicle_py.images.image import LayerRefused, open_stream
from popsicle_py.records import record

__all__ = ["RAW_LIMIT", "Sample", "runnable", "take_sample"]

#: The most bytes read from the source while sampling (compressed data larger than the decoded
#: head it holds, plus a decoder's read-ahead): beyond it the sample is cut short.
RAW_LIMIT = 2 * sanity.ISO_SCAN + (4 << 20)

_STEP = 64 << 10  # per read from the source: no more is read than the decoders ask for

#: ``more(n)``: up to ``n`` further bytes of the source, b"" at its end, None when it was cut
#: (a connection lost or too slow): what was read is kept, the rest is the stream's business.
More = Callable[[int], "bytes | None"]


@record
class Sample:
    """What was read of a stream before writing: ``raw``, every byte taken from the source (to
    be served again first); ``head``, the decoded image's first bytes (None when they could not
    be read: damaged or cut short, left to the writing pass, as for a file); ``complete``, when
    ``head`` is the whole decoded image."""

    raw: bytes
    head: bytes | None
    complete: bool


class _Recording(io.RawIOBase):
    """The source as read so far, kept: ``first`` then what ``more`` gives, up to a limit."""

    def __init__(self, first: bytes, more: More, limit: int) -> None:
        super().__init__()
        self.kept = bytearray(first)
        self._at = 0
        self._more = more
        self._limit = limit
        self.ended = False  # the source's real end
        self.cut = False  # stopped before it: the limit, an error, a deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        if self._at == len(self.kept) and not (self.ended or self.cut):
            room = self._limit - len(self.kept)
            data = self._more(min(len(out), room, _STEP)) if room > 0 else None
            if data is None:
                self.cut = True
            elif not data:
                self.ended = True
            else:
                self.kept += data
        n = min(len(out), len(self.kept) - self._at)
        out[:n] = self.kept[self._at:self._at + n]
        self._at += n
        return n

    def close(self) -> None:  # the source itself stays open: the stream goes on from it
        super().close()


def _fill(stream: io.RawIOBase, head: bytearray, want: int) -> bool:
    """Read ``stream`` into ``head`` up to ``want`` bytes; True at its end.  What was read
    before an error stays in ``head``."""
    while len(head) < want:
        data = stream.read(min(want - len(head), _STEP))
        if not data:
            return True
        head += data
    return False


def take_sample(first: bytes, more: More, kind: Format, name: str,
                limit: int = RAW_LIMIT) -> Sample:
    """Read and decode the start of a stream of format ``kind`` whose first bytes ``first``
    were read already (to judge the format).

    A layer inside that is refused or empty (``X (inside its gzip layer) is empty``) raises
    its ImageError, as for a file; a decoding error leaves the head unknown.
    """
    source = _Recording(first, more, limit)
    head = bytearray()
    ended = False
    try:
        stream = open_stream(source, kind.name, name)  # type: ignore[arg-type]
        ended = _fill(stream, head, sanity.HEAD_SIZE)  # type: ignore[arg-type]
        if not ended and sanity.needs_more(bytes(head)):  # an ISO: what does it hold?
            ended = _fill(stream, head, sanity.ISO_SCAN)  # type: ignore[arg-type]
    except LayerRefused:
        raise
    except ImageError:
        ended = False  # damaged or cut short: judged on what came before, if enough
    complete = ended and not source.cut
    whole = complete or len(head) >= sanity.HEAD_SIZE
    return Sample(bytes(source.kept), bytes(head) if whole else None, complete)
