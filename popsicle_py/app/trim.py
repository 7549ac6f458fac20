"""Which ranges of an image a flash writes when its file systems leave part of it free.

Decided before anything is opened for writing, from the image read by position: a raw image
file on this machine (not a master drive, which may change meanwhile).  Not for a block map
(it wins), a URL or a compressed image (they would be read twice: written whole), nor when
every byte must be read anyway (the checksum computed in the write pass, a certificate of the
whole image read back).  See :mod:`popsicle_py.usage` for what is read and trusted.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from popsicle_py import events
from popsicle_py.bmap import Bmap, Extent
from popsicle_py.images import Image, ImageError, read_head
from popsicle_py.protocols import Source
from popsicle_py.units import format_size
from popsicle_py.usage import ALIGN, Usage, has_table_or_fs, image_usage, worth_it

Emit = Callable[[events.WatchEvent], None]


@dataclass(frozen=True)
class Trim:
    """The ranges to write (None: every byte), and the lines to show before the run."""

    usage: Usage | None
    notes: tuple[str, ...] = ()

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
        """Bytes of the image not written: free space of its file systems."""
        return self.usage.skipped if self.usage is not None else 0

    def emitter(self, emit: Emit) -> Emit:
        """``emit`` with the bytes not written in each drive's result and in the summary."""
        unused = self.unused
        if not unused:
            return emit

        def relay(event: events.WatchEvent) -> None:
            if isinstance(event, events.Result):
                event = dataclasses.replace(event, result=dataclasses.replace(
                    event.result, bytes_unused=unused))
            elif isinstance(event, events.Summary):
                event = dataclasses.replace(event, results=tuple(
                    dataclasses.replace(r, bytes_unused=unused) for r in event.results))
            emit(event)
        return relay


NONE = Trim(None)
#: What a compressed image with file systems is told (it would have to be decoded twice).
COMPRESSED = ("compressed image: written whole, free space included (only a raw image's free "
              "space is skipped: decompress it first to skip it)")


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
        return image_usage(read_at, size)
    except OSError as exc:
        raise ImageError(f"{image.path} cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


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
        return Trim(None, (COMPRESSED,)) if has_table_or_fs(head, image.size) else NONE
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
