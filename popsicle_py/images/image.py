"""Source images as people download them: raw or compressed, opened once, read in every pass.

:func:`open_image` checks the file, asks the format registry (formats.py) what it is and learns
its size where the format allows; :class:`Image` opens a fresh decoded stream per pass.
"""

from __future__ import annotations

import dataclasses
import io
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

from popsicle_py.files import create_regular
from popsicle_py.images.checksums import ChecksumTap
from popsicle_py.images.decoders import read_decoded
from popsicle_py.images.files import ImageError, open_file
from popsicle_py.images.formats import (
    HEAD_SIZE,
    TAIL_SIZE,
    Format,
    Stored,
    by_name,
    end_refusal,
    ends_as,
    judge,
    lacks_check,
    name_warning,
    runnable,
)
from popsicle_py.records import record

if TYPE_CHECKING:
    from popsicle_py.pacing import Clock

__all__ = [
    "EndJudged",
    "Image",
    "Replay",
    "decompress_to",
    "open_image",
    "open_stream",
    "peel",
    "read_full",
    "read_head",
]

#: The most layers decoded one inside the other (a zip holding an .img.xz is two).
MAX_LAYERS = 4


@record
class _Layer:
    """What one layer's decoder needs: its file (or its name in messages, for an inner layer),
    its decoded size, its member, and how messages name it when not by ``path``."""

    path: str
    size: int | None
    member: str | None = None
    shown: str | None = None

    @property
    def name(self) -> str:
        return self.shown or self.path


class LayerRefused(ImageError):
    """An inner layer that is refused (not a decoding error of the layer around it)."""


class Replay(io.RawIOBase):
    """Bytes already read from a stream (to judge its format), then the rest of the stream."""

    def __init__(self, head: bytes, rest: io.RawIOBase | BinaryIO) -> None:
        super().__init__()
        self._head = memoryview(head)
        self._rest = rest

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._rest.fileno()

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(out), len(self._head))
            out[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._rest.readinto(out) or 0  # type: ignore[union-attr]

    def close(self) -> None:
        if not self.closed:
            self._rest.close()
        super().close()


class EndJudged(io.RawIOBase):
    """A stream judged at its end as a file is by its last bytes.

    An Apple disk image shows only by its trailer: inside a .gz, or from standard input or a
    URL, it would be written raw and end ok.  Its last :data:`TAIL_SIZE` bytes are kept as
    they pass, and the read that finds the end raises ImageError when they end as a format
    does: after every bucket is written, before the engine vouches for the source, so every
    drive fails with its head (the partition table) never written.
    """

    def __init__(self, stream: io.RawIOBase | BinaryIO, name: str, shown: str,
                 saved: str | None = None) -> None:
        super().__init__()
        self._stream = stream
        self._tail = bytearray()
        #: ``name`` in the refusal; ``shown`` and ``saved`` make its commands runnable (see
        #: :func:`~.formats.runnable`).
        self._words = (name, shown, saved)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        n = self._stream.readinto(view) or 0  # type: ignore[union-attr]
        if n >= TAIL_SIZE:
            self._tail[:] = view[n - TAIL_SIZE : n]
        elif n:
            self._tail += view[:n]
            del self._tail[: max(0, len(self._tail) - TAIL_SIZE)]
        elif len(view) and (kind := ends_as(bytes(self._tail))) is not None:
            name, shown, saved = self._words
            raise ImageError(runnable(end_refusal(kind, name), shown, saved))
        return n

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()


def read_full(stream: io.RawIOBase | BinaryIO, length: int) -> bytes:
    """``length`` bytes from the stream, fewer only at its end (a pipe gives what it has)."""
    chunks: list[bytes] = []
    got = 0
    while got < length:
        data = stream.read(length - got)
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def peel(stream: io.RawIOBase, name: str, outer: Format) -> tuple[io.RawIOBase, list[Format]]:
    """Decode the layers inside a decoded stream, each judged by its own first bytes (an
    .img.xz inside a zip, an .xz inside a .gz); the innermost stream and the inner formats.
    ImageError for an inner layer that is refused, damaged, or a zip (which needs seeking)."""
    inner: list[Format] = []
    above = outer
    while True:
        head = read_full(stream, HEAD_SIZE)
        where = f"{name} (inside its {above.name} layer)"
        if not head:  # as a raw file of 0 bytes is: refused, whatever --force says
            raise LayerRefused(f"{where} is empty")
        try:
            kind = judge(head, where)
        except ImageError as e:
            raise LayerRefused(str(e)) from None
        stream = Replay(head, stream)
        if not kind.decoded:
            return stream, inner
        if kind.needs_whole_file:
            stream.close()
            raise LayerRefused(f"{where} is {_a(kind.name)} file, which cannot be decoded "
                               f"inside another layer: decompress the {above.name} layer first")
        if len(inner) + 1 >= MAX_LAYERS:
            stream.close()
            raise LayerRefused(f"{where} is {_a(kind.name)} file, one layer more than the "
                               f"{MAX_LAYERS} popsicle-py decodes one inside the other: "
                               f"decompress the outer layers first")
        assert kind.decoder is not None
        stream = kind.decoder(_Layer(where, None), raw=stream)
        inner.append(kind)
        above = kind


def _a(name: str) -> str:
    """A format's name with its article, as it is said: "an xz", "an lzma", "a gzip"."""
    return f"{'an' if name.startswith(('x', 'l')) else 'a'} {name}"


@record
class Image:
    """One source image; cheap to keep around, and open() can be called once per pass."""

    path: str
    format: str
    size: int | None
    file_size: int
    member: str | None = None
    warning: str | None = None  # e.g. named .xz but not xz inside; worth showing, not fatal
    layers: tuple[str, ...] = ()  # formats inside the outer one, decoded one after the other
    outer_size: int | None = None  # the outer layer's decoded size, when there are layers
    #: How the file lacks an integrity check of its own (formats.lacks_check), or None.
    unchecked: str | None = None
    #: How messages name the image when not by its path (a copy of standard input).
    shown: str | None = None

    @property
    def name(self) -> str:
        """The image as messages name it."""
        return self.shown or self.path

    @property
    def kind(self) -> Format:
        """The registry's record of :attr:`format`: what to ask instead of comparing names."""
        return by_name(self.format)

    @property
    def seekable_raw(self) -> bool:
        """True when offsets in the stream are offsets in the file (exact os.pread allowed)."""
        return not self.kind.decoded

    @property
    def compressed(self) -> bool:
        """True when the stream is decoded: no fileno(), no positional reads."""
        return self.kind.decoded

    def open(self, tap: ChecksumTap | None = None) -> io.RawIOBase:
        """A fresh stream at offset 0: the file itself for raw, a decompressor otherwise.

        Compressed streams fill readinto()'s buffer completely except at the end, and raise
        ImageError (never a short EOF) when the data is truncated or corrupt.  With ``tap``,
        every byte of the file as stored (compressed or not) is hashed as it is read, so the
        checksum vouches for the very bytes that were decoded and written.
        """
        decoder = self.kind.decoder
        if decoder is None:
            raw: io.RawIOBase = open_file(self.path, self.name, tap)
            return raw
        if not self.layers:  # a zip's decoder leaves the tap unused: see tappable
            return EndJudged(decoder(self, tap), f"{self.name} (inside its {self.format} "
                             "layer)", self.name)
        stream = decoder(_Layer(self.path, self.outer_size, self.member, self.shown), tap)
        above = self.format
        for i, name in enumerate(self.layers):
            inner = by_name(name).decoder
            assert inner is not None
            last = i == len(self.layers) - 1
            stream = inner(_Layer(f"{self.name} (inside its {above} layer)",
                                  self.size if last else None), raw=stream)
            above = name
        return EndJudged(stream, f"{self.name} (inside its {above} layer)", self.name)

    @property
    def tappable(self) -> bool:
        """Whether :meth:`open` can hash the file in the same pass (a zip is read by seeking)."""
        return self.kind.streamed

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the image at ``offset``: by position when raw, else decoded again.

        For repairs of a few bad buckets; a compressed image is decompressed up to them.
        """
        with self.open() as stream:
            if self.seekable_raw:
                return os.pread(stream.fileno(), length, offset)
            return read_decoded(stream, offset, length)


def read_head(image: Image, length: int) -> bytes:
    """The first ``length`` bytes of the decoded image, fewer when the image is shorter.

    For a compressed image this decodes only as far as needed (the sanity check looks at the
    start of what would be written, not at the compressed file).
    """
    try:
        with image.open() as stream:
            return read_full(stream, length)
    except OSError as e:
        raise ImageError(f"{image.name} cannot be read: {e.strerror or e}") from None


def open_stream(raw: BinaryIO, fmt: str, name: str, size: int | None = None,
                saved: str | None = None) -> BinaryIO:
    """Decode an already open stream of ``fmt`` data (a download, standard input) exactly as
    open() decodes a file, with the layers inside it (each judged by its first bytes), and
    judged at its end as a file is by its last bytes (:class:`EndJudged`).

    ``name`` is used in messages (``saved`` says what FILE is in their commands); ``size``,
    when known, is checked like a header's size (of the outer layer's decoded bytes).  A zip
    needs its directory at the end of the file, so it cannot be read from a stream.
    """
    kind = by_name(fmt)
    if kind.decoder is None:
        return EndJudged(raw, name, name, saved)  # type: ignore[return-value]
    if kind.needs_whole_file:
        raise ImageError(f"{name} is a {kind.name} file, which cannot be read as a stream: "
                         "save it to a file first")
    stream, inner = peel(kind.decoder(_Layer(name, size), raw=raw), name, kind)
    where = f"{name} (inside its {(inner[-1] if inner else kind).name} layer)"
    return EndJudged(stream, where, name, saved)  # type: ignore[return-value]


def open_image(path: str, shown: str | None = None) -> Image:
    """Check the file, detect its format by magic bytes and learn its size where possible.

    ``shown``: how messages name it when not by the path given (a copy of standard input)."""
    named = shown
    shown = shown or path
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{shown} does not exist") from None
    except OSError as e:
        raise ImageError(f"{shown} cannot be opened: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{shown} is a directory, not an image")
    if stat.S_ISFIFO(st.st_mode):
        # Read only once, while every pass (checksum, write, verify) reopens a file: as "-".
        raise ImageError(f"{shown} is a named pipe (FIFO), which can be read only once: give "
                         f"it as standard input (`popsicle-py flash - DEVICE < {shown}`)")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ImageError(f"{shown} is not a regular file or block device")
    with open_file(path, shown) as f:
        file_size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(f.fileno(), 0, os.SEEK_END)
        if file_size == 0:
            raise ImageError(f"{shown} is empty")
        try:
            head = os.pread(f.fileno(), HEAD_SIZE, 0)
            tail = os.pread(f.fileno(), TAIL_SIZE, max(0, file_size - TAIL_SIZE))
            kind = judge(head, shown, tail)
            size: int | None = None
            member = None
            if kind.measure is not None:
                size, member = kind.measure(Stored(path, shown, f.fileno(), file_size, head))
        except OSError as e:
            raise ImageError(f"{shown} cannot be read: {e.strerror or e}") from None
    warning = name_warning(shown, os.path.splitext(path)[1], kind)
    image = Image(path, kind.name, size, file_size, member, warning,
                  unchecked=lacks_check(kind, head), shown=named)
    return _with_layers(image, kind)


def _with_layers(image: Image, kind: Format) -> Image:
    """The image with the layers its decoded bytes hold (found by decoding their first bytes).

    A start that cannot be decoded is left to the writing pass, which names the byte.
    """
    if not kind.decoded:
        return image
    try:
        stream = image.open()
    except ImageError:
        return image
    try:
        _, inner = peel(stream, image.name, kind)
    except LayerRefused:
        raise
    except ImageError:
        return image
    finally:
        stream.close()
    if not inner:
        return image
    # A layer inside whose format always checks what it holds (gzip, bzip2) sees damage to
    # the outer one's bytes too.
    unchecked = image.unchecked if all(f.unchecked is not None for f in inner) else None
    return dataclasses.replace(image, layers=tuple(f.name for f in inner),
                               outer_size=image.size, size=None, unchecked=unchecked)


def decompress_to(image: Image, path: str, cancel: Callable[[], bool],
                  progress: Callable[[int], None], stall_timeout: float | None = None
                  ) -> int | None:
    """Write the image's decoded bytes to a new file at ``path``; their count, None if cancelled.

    On a thread of its own (``progress`` is called on this one): a share or disk that stops
    answering holds that thread, not the caller, so a stop is heard, and no progress for
    ``stall_timeout`` is an ImageError.  ImageError too when the image is corrupt or the file
    cannot be written.
    """
    from popsicle_py.engine.watched import WorkStalled, watched

    said = [0, 0]  # bytes done, bytes said

    def work(clock: Clock, stopped: Callable[[], bool]) -> int | None:
        buf = memoryview(bytearray(1 << 20))  # a MiB a step: the stall clock's unit
        with image.open() as source, create_regular(path) as out:
            while not stopped():
                n = source.readinto(buf) or 0
                if not n:
                    return said[0]
                out.write(buf[:n])
                said[0] += n
                clock.advance(n)
        return None

    def tick() -> None:
        if said[0] != said[1]:
            said[1] = said[0]
            progress(said[1])

    try:
        return watched(work, cancel=cancel, stall_timeout=stall_timeout, tick=tick,
                       name="decompress")
    except WorkStalled as exc:
        raise ImageError(f"{image.name} stopped answering while it was decompressed: no "
                         f"progress for {exc.limit:g} s (is the disk or share it is on, or "
                         f"the one of {os.path.dirname(path)}, hung?)") from None
    except OSError as exc:
        raise ImageError(f"cannot decompress {image.name} to {path}: "
                         f"{exc.strerror or exc}") from None
