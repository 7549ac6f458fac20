"""Which ranges of an image a flash writes when its file systems leave part of it free.

A raw image file on this machine (not a master drive, which may change meanwhile) is read by
position before anything is opened for writing: the ranges to write are known in advance.  A
compressed image is decoded once, in the flash itself: which of its bytes are written is decided
as it goes by (:mod:`popsicle_py.usage.stream`), and known only at the end.  Not for a block
map (it wins), a URL (its decoded head is not at hand before the run: written whole), nor when
every byte must be read back (a certificate of the whole image) or, for a raw image, read at all
(the checksum computed in the write pass).  See :mod:`popsicle_py.usage` for what is read and
trusted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING

from popsicle_py import events
from popsicle_py.bmap import Bmap, Extent
from popsicle_py.engine.head import HEAD, head_length
from popsicle_py.images import Image, ImageError, read_head
from popsicle_py.protocols import Source
from popsicle_py.records import record
from popsicle_py.units import format_size
from popsicle_py.usage import (
    ALIGN,
    ISO_NOTE,
    Usage,
    has_table_or_fs,
    image_usage,
    is_iso9660,
    worth_it,
)
from popsicle_py.usage.ranges import normalize

if TYPE_CHECKING:
    from popsicle_py.usage.stream import StreamSelector

Emit = Callable[[events.WatchEvent], None]


@record
class Trim:
    """The ranges to write (None: every byte), and the lines to show before the run."""

    usage: Usage | None
    notes: tuple[str, ...] = ()
    #: A compressed image's trim, decided as it is decoded (one flash: it keeps its state).
    select: StreamSelector | None = None
    #: The image's decoded size, when known (a stream's progress totals shrink to what is kept).
    size: int | None = None
    #: A block map's holes: neither written nor verified, counted as the free space trim skips.
    holes: int = 0

    @property
    def block_map(self) -> Bmap | None:
        """The ranges to write as a block map (no checksums): the engine's only_extents path."""
        usage = self.usage
        if usage is None:
            return None
        return Bmap("(its file systems' allocation)", "trim", usage.size, ALIGN, None,
                    tuple(Extent(offset, length) for offset, length in usage.ranges))

    @property
    def unused(self) -> int:
        """Bytes of the image not written: free space of its file systems (a stream's: so
        far, all of it once the stream was read to its end)."""
        if self.select is not None:
            return self.select.skipped
        return self.usage.skipped if self.usage is not None else self.holes

    def after(self) -> tuple[str, ...]:
        """What a stream's trim found, said once the flash ended (nothing for a raw image's,
        whose notes came before)."""
        select = self.select
        if select is None:
            return ()
        lines = [*select.found, *select.notes]
        if select.skipped:
            lines.append(f"free space not written: {format_size(select.skipped)} of "
                         f"{format_size(select.pos)} decoded")
        return tuple(lines)

    def emitter(self, emit: Emit) -> Emit:
        """``emit`` with the bytes not written in each drive's result and in the summary; for a
        stream, progress totals less what was skipped so far, and its findings before the
        summary."""
        if self.select is None and not self.unused:
            return emit
        select, size = self.select, self.size

        def relay(event: events.WatchEvent) -> None:
            unused = self.unused
            if isinstance(event, events.Progress) and select is not None \
                    and event.total is not None and event.total == size:
                event = dataclasses.replace(event, total=event.total - unused)
            elif isinstance(event, events.Summary):
                for line in self.after():
                    emit(events.Note(line))
            if not unused:
                emit(event)
                return
            if isinstance(event, events.Result):
                event = dataclasses.replace(event, result=dataclasses.replace(
                    event.result, bytes_unused=unused))
            elif isinstance(event, events.Summary):
                event = dataclasses.replace(event, results=tuple(
                    dataclasses.replace(r, bytes_unused=unused) for r in event.results))
            emit(event)
        return relay


NONE = Trim(None)
#: Why a run with certificates writes every byte (flash, watch and the station alike).
CERTIFICATE_READS_ALL = "--certificate reads the whole image back"
#: What a compressed image with file systems is told before the run.
STREAMED = ("compressed image: free space of its file systems decided as it is decoded, and "
            "not written (--no-trim writes every byte)")


def _is_drive(path: str) -> bool:
    """A master drive: its file systems could change between this read and the copy's (a
    mount), and free space read then would be skipped now; written whole."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def read_usage(image: Image) -> Usage:
    """The usage of a raw image file, read by position (a few MiB of metadata)."""
    size = image.size or 0
    try:
        fd = os.open(image.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"{image.path} cannot be read: {exc.strerror or exc}") from None
    try:
        def read_at(offset: int, length: int) -> bytes:
            return os.pread(fd, max(0, min(length, size - offset)), offset)
        usage = image_usage(read_at, size)
        # The engine writes the image's head whole (a bare file system's free blocks in it
        # too): counted as written, with the image's bytes rather than zeros there.
        head = min(size, head_length(read_at(0, 64 << 10)))
        ranges = normalize([*usage.ranges, (0, head)], size)
        return dataclasses.replace(usage, ranges=ranges)
    except OSError as exc:
        raise ImageError(f"{image.path} cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def map_holes(image: Source, block_map: Bmap) -> Trim:
    """No trim, but a block map's holes said in each result (``bytes_unused``) and its line
    ("... of free space not written"): a drive flashed from a map holds its ranges only, and
    the image's head (written whole, its holes as the image's zeros)."""
    head = HEAD
    if isinstance(image, Image):
        with contextlib.suppress(ImageError):  # left to the flash, which names the offset
            head = head_length(read_head(image, 64 << 10))
    mapped = sum(max(0, e.end - max(e.offset, head)) for e in block_map.extents)
    return Trim(None, holes=max(0, block_map.image_size - head) - mapped)


def plan_trim(image: Source, *, wanted: bool, whole_because: str | None = None) -> Trim:
    """The ranges to write for ``image`` (``wanted``: not --no-trim, no block map);
    ``whole_because``: why every byte must be read after all (said in a note when it costs)."""
    if not wanted or not isinstance(image, Image):
        return NONE
    if image.compressed:
        try:
            head = read_head(image, 64 << 10)
        except ImageError:
            return NONE  # left to the flash, which names the image and the offset
        if not has_table_or_fs(head, image.size):
            return NONE
        if is_iso9660(lambda offset, length: head[offset : offset + length]):
            return Trim(None, (ISO_NOTE,))  # the drives keep their own pace (spill)
        if whole_because is not None:
            return Trim(None, (f"free space of the image's file systems written too: "
                               f"{whole_because}",))
        from popsicle_py.usage.stream import StreamSelector  # for compressed images only

        return Trim(None, (STREAMED,), StreamSelector(image.size), image.size)
    if not image.size or _is_drive(image.path):
        return NONE
    usage = read_usage(image)
    notes = [*usage.found, *usage.notes]
    if not worth_it(usage):
        return Trim(None, tuple(usage.notes))
    if whole_because is not None:
        return Trim(None, (f"free space of the image's file systems written too "
                           f"({format_size(usage.skipped)}): {whole_because}",))
    notes.append(f"writing {format_size(usage.used)} of {format_size(usage.size)}: "
                 f"{format_size(usage.skipped)} of free space in its file systems skipped "
                 "(--no-trim writes every byte)")
    return Trim(usage, tuple(notes))
