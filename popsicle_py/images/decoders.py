"""The decompressing streams: one class per way of decoding, chosen by the format registry.

Compressed images are decompressed on the fly, never to a temporary file, and every way a stream
can end early or be damaged becomes an :class:`ImageError` that names the image and the
uncompressed offset reached, so a bad download can never look like a successful flash.  These
classes know nothing of format names: formats.py says which one decodes what.
"""

from __future__ import annotations

import functools
import io
import zlib
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast

from popsicle_py.images.files import READ_SIZE, ImageError, Readable, Tap, open_file
from popsicle_py.images.sizes import XZ_MAGIC, ZstdLayout

if TYPE_CHECKING:
    import bz2
    import lzma

#: Decoded bytes per decoder call, compressed bytes per xz/bzip2 feed: small enough that an
#: error names the byte where decoding failed to within this much, large enough to cost
#: nothing measurable (a Python call per 256 KiB).
_STEP = 256 << 10
_FEED = 64 << 10
#: The largest zstd window decoded: 2 GiB, the most zstd itself writes (``--long=31``).
_ZSTD_WINDOW = 1 << 31

__all__ = [
    "Bzip2Stream",
    "Decodable",
    "DecoderFactory",
    "GzipStream",
    "LzmaAloneStream",
    "XzStream",
    "ZipStream",
    "ZstdStream",
    "read_decoded",
]


class Decodable(Protocol):
    """What a decoder needs of the image (images.Image): where it is, how messages name it
    (``name``: the path, or "standard input" for a copy of it), and what it should hold."""

    @property
    def path(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int | None: ...

    @property
    def member(self) -> str | None: ...


class DecoderFactory(Protocol):
    """A format's decoder: the image's file (``tap`` hashing it), or ``raw``, decoded."""

    def __call__(self, image: Decodable, tap: Tap | None = None,
                 raw: Readable | None = None) -> io.RawIOBase: ...


def read_decoded(stream: Any, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of a stream that cannot seek: what precedes is decoded
    and dropped (b"" when the stream ends before ``offset``)."""
    scratch = memoryview(bytearray(min(4 << 20, max(offset, 1))))
    done = 0
    while done < offset:
        got = stream.readinto(scratch[: min(len(scratch), offset - done)])
        if not got:
            return b""
        done += got
    out = bytearray()
    while len(out) < length:
        chunk = stream.read(length - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


class _Corrupt(Exception):
    """Internal: a stream-level problem found by our own checks rather than by a decoder."""


@functools.cache
def _decode_errors() -> tuple[type[BaseException], ...]:
    """What the decoders raise for damaged data.  Their libraries are imported when a stream
    of theirs is first made (none of them for a raw image, issue 30), and so here only once
    an error is being caught."""
    import lzma
    import zipfile

    import zstandard
    from zlib_ng import zlib_ng

    return (EOFError, OSError, lzma.LZMAError, zlib.error, zlib_ng.error,  # type: ignore[return-value]
            zstandard.ZstdError, zipfile.BadZipFile, _Corrupt)


class _Stream(io.RawIOBase):
    """Common part of the decompressing streams: full-buffer reads, offsets, error wording."""

    def __init__(self, image: Decodable) -> None:
        super().__init__()
        self._image = image
        self._pos = 0
        self._done = False
        self._error: ImageError | None = None

    def readable(self) -> bool:
        return True

    def _fill(self, out: memoryview) -> int:
        """Write up to len(out) bytes (at least one); 0 means the decoder reached its end."""
        raise NotImplementedError

    def _check_end(self) -> None:
        """Raise _Corrupt if the stream ended somewhere a complete image cannot end."""

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._error is not None:
            raise self._error
        if self.closed:
            raise ValueError("I/O operation on closed file")
        out = memoryview(buffer).cast("B")
        filled = 0
        size = self._image.size
        try:
            while filled < len(out) and not self._done:
                n = self._fill(out[filled:])
                if n == 0:
                    self._check_end()
                    if size is not None and self._pos != size:
                        raise _Corrupt(f"it ends early; the image should be {size} bytes")
                    self._done = True
                    break
                filled += n
                self._pos += n
                if size is not None and self._pos > size:
                    raise _Corrupt(f"it holds more than the {size} bytes its header states")
        except _decode_errors() as e:
            self._error = self._wrap(e)
            raise self._error from e
        return filled

    def _consumed(self) -> int | None:
        """Bytes of the compressed file the decoder has taken so far (None: not known)."""
        return None

    def _wrap(self, e: BaseException) -> ImageError:
        where = f"at byte {self._pos} of the uncompressed image"
        consumed = self._consumed()
        if consumed is not None:
            where += f", byte {consumed} of the compressed file"
        if isinstance(e, OSError) and e.errno is not None:  # the disk, not the data
            return ImageError(f"{self._image.name} could not be read ({where}): {e.strerror or e}")
        if isinstance(e, EOFError):
            reason = "the compressed data ends early (incomplete download?)"
        else:
            reason = str(e) or type(e).__name__
        return ImageError(f"{self._image.name} is corrupt or truncated ({where}): {reason}")

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        buf = bytearray(size)
        n = self.readinto(buf)
        del buf[n:]
        return bytes(buf)

    def readall(self) -> bytes:
        chunks = []
        while chunk := self.read(READ_SIZE * 4):
            chunks.append(chunk)
        return b"".join(chunks)


if TYPE_CHECKING:
    _Decoder: TypeAlias = zlib._Decompress | lzma.LZMADecompressor | bz2.BZ2Decompressor


class _ChainedStream(_Stream):
    """gzip, xz and bzip2: one decoder per member/stream, strict about what lies between them.

    The stdlib file classes treat undecodable data after the first stream as harmless trailing
    garbage and stop quietly, so a damaged second stream (pbzip2, multi-member gzip) would read
    as a short, "successful" image. Here only zero padding may follow a stream.
    """

    #: What every stream (member) starts with: after one, only zeros or another may follow.
    magic: bytes
    #: Zero bytes after a stream come in multiples of this (xz: 4); 0: nothing may follow it.
    padding = 1
    #: The decoder is fed with a limit and says when it needs input (liblzma, libbz2); else
    #: it is zlib's, which keeps what it has not decoded in ``unconsumed_tail``.
    feeds = False

    def __init__(self, image: Decodable, tap: Tap | None = None,
                 raw: Readable | None = None) -> None:
        super().__init__(image)
        self._file = raw if raw is not None else open_file(image.path, image.path, tap)
        self._pending = b""
        self._decoder: _Decoder | None = None
        self._streams = 0
        self._fed = 0  # bytes read from the file

    def _read(self, size: int) -> bytes:
        data = self._file.read(size)
        self._fed += len(data)
        return data

    def _consumed(self) -> int | None:
        return self._fed - len(self._pending)

    def _new_decoder(self) -> _Decoder:
        """A decoder for the next stream; each format's subclass says which."""
        raise NotImplementedError

    def _fill(self, out: memoryview) -> int:
        data = self._produce(min(len(out), _STEP))
        out[: len(data)] = data
        return len(data)

    def _start_stream(self) -> bool:
        """Make sure what follows a stream is padding, then another stream or the end; False
        at a clean end.  The first stream starts at the first byte (no padding before it)."""
        if self._streams:
            zeros = 0
            while True:
                stripped = self._pending.lstrip(b"\0")
                zeros += len(self._pending) - len(stripped)
                self._pending = stripped
                if self._pending and len(self._pending) >= len(self.magic):
                    break
                more = self._read(READ_SIZE)
                if not more:
                    break
                self._pending += more
            after = f"after the end of compressed stream {self._streams}"
            if not self.padding and (zeros or self._pending):
                raise _Corrupt(f"unexpected data {after} (nothing may follow it)")
            if self.padding and zeros % self.padding:
                raise _Corrupt(f"{zeros} zero bytes {after}: stream padding comes in "
                               f"multiples of {self.padding} bytes")
            if not self._pending:
                return False
            if not self._pending.startswith(self.magic):
                raise _Corrupt(f"unexpected data {after}")
        self._decoder = self._new_decoder()
        self._streams += 1
        return True

    def _produce(self, limit: int) -> bytes:
        while True:
            if self._decoder is None and not self._start_stream():
                return b""  # clean end after a complete stream
            dec = self._decoder
            assert dec is not None
            if self.feeds:
                dec = cast("lzma.LZMADecompressor | bz2.BZ2Decompressor", dec)
                data = b""
                if dec.needs_input:
                    data = self._pending or self._read(_FEED)
                    self._pending = b""
                    if not data:
                        raise EOFError
                out = dec.decompress(data, limit)
                self._check_stream(dec)
                if dec.eof:
                    self._pending = dec.unused_data
            else:
                dec = cast("zlib._Decompress", dec)
                if not self._pending:
                    self._pending = self._read(READ_SIZE)
                    if not self._pending:
                        raise EOFError
                out = dec.decompress(self._pending, limit)
                # At the end zlib reports the leftover in both; unused_data is the one to keep.
                self._pending = dec.unused_data if dec.eof else dec.unconsumed_tail
            if dec.eof:
                self._decoder = None
            if out:
                return out

    def _check_stream(self, dec: _Decoder) -> None:
        """Raise _Corrupt for a stream header this decoder reads but must not trust."""

    def close(self) -> None:
        if not self.closed and hasattr(self, "_file"):
            self._file.close()
        super().close()


class GzipStream(_ChainedStream):
    """gzip, one member after another (multi-member files, pigz)."""

    magic = b"\x1f\x8b"

    def _new_decoder(self) -> _Decoder:
        # zlib-ng inflates about 2.5x faster than the stdlib's zlib (bench/bench_images.py);
        # like zlib it checks the CRC-32 and length of every member.
        from zlib_ng import zlib_ng

        return zlib_ng.decompressobj(16 + zlib_ng.MAX_WBITS)  # type: ignore[return-value]


class XzStream(_ChainedStream):
    """xz, one stream after another; liblzma checks each stream's index and integrity check."""

    magic = XZ_MAGIC

    padding = 4  # xz -t: stream padding is a multiple of four zero bytes
    feeds = True

    def _new_decoder(self) -> _Decoder:
        import lzma

        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)

    def _check_stream(self, dec: _Decoder) -> None:
        import lzma

        check = getattr(dec, "check", lzma.CHECK_UNKNOWN)
        if check != lzma.CHECK_UNKNOWN and not lzma.is_check_supported(check):
            raise _Corrupt(f"stream {self._streams} uses integrity check ID {check}, which "
                           "cannot be verified (xz -t warns the same)")


class LzmaAloneStream(_ChainedStream):
    """LZMA-alone (.lzma, ``xz --format=lzma``): one stream, nothing after it (as ``xz -t``)."""

    magic = b""
    padding = 0
    feeds = True

    def _new_decoder(self) -> _Decoder:
        import lzma

        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)


class Bzip2Stream(_ChainedStream):
    """bzip2, one stream after another (pbzip2 writes many)."""

    magic = b"BZh"
    feeds = True

    def _new_decoder(self) -> _Decoder:
        import bz2

        return bz2.BZ2Decompressor()


class _Tap:
    """Passes the compressed bytes to zstandard while a ZstdLayout watches the frame structure."""

    def __init__(self, raw: Readable, layout: ZstdLayout) -> None:
        self._raw = raw
        self._layout = layout
        self._steps: Generator[tuple[int, bool], bytes | None, None] | None = layout.steps()
        self._need, self._want = next(self._steps)
        self._buf = bytearray()
        self.read_bytes = 0

    def _send(self, value: bytes | None) -> None:
        assert self._steps is not None
        self._need, self._want = self._steps.send(value)
        while self._need == 0:  # an empty skippable frame or raw block
            self._need, self._want = self._steps.send(None)

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size if size and size > 0 else READ_SIZE)
        self.read_bytes += len(data)
        if data and self._steps is not None:
            self._track(data)
        return data

    def _track(self, data: bytes) -> None:
        view = memoryview(data)
        i = 0
        try:
            while i < len(view):
                if not self._want:
                    take = min(self._need, len(view) - i)
                    i += take
                    self._need -= take
                    if self._need == 0:
                        self._send(None)
                    continue
                take = min(self._need - len(self._buf), len(view) - i)
                self._buf += view[i : i + take]
                i += take
                if len(self._buf) == self._need:
                    chunk = bytes(self._buf)
                    self._buf.clear()
                    self._send(chunk)
        except StopIteration:
            self._steps = None  # layout.problem is set; the decoder will complain too

    def complete(self) -> bool:
        return self._steps is not None and self._layout.at_boundary and not self._buf


class ZstdStream(_Stream):
    """zstd through zstandard's stream_reader, with truncation detected by ZstdLayout."""

    def __init__(self, image: Decodable, tap: Tap | None = None,
                 raw: Readable | None = None) -> None:
        super().__init__(image)
        self._file = raw if raw is not None else open_file(image.path, image.path, tap)
        self._layout = ZstdLayout()
        self._tap = _Tap(self._file, self._layout)
        import zstandard

        # Any window the format allows (zstd --long=31 streams: 2 GiB), as xz's dictionary:
        # zstandard's default stops at 128 MiB and fails such a sound file.  Memory is taken
        # as the window fills, so no more than the image's size.
        self._reader = zstandard.ZstdDecompressor(max_window_size=_ZSTD_WINDOW).stream_reader(
            self._tap,  # type: ignore[arg-type]  # anything with read() will do
            read_size=READ_SIZE, read_across_frames=True, closefd=False,
        )

    def _fill(self, out: memoryview) -> int:
        return self._reader.readinto(out)

    def _consumed(self) -> int | None:
        return self._tap.read_bytes

    def _check_end(self) -> None:
        if self._layout.problem:
            raise _Corrupt(self._layout.problem)
        if not self._tap.complete():
            raise EOFError

    def close(self) -> None:
        if not self.closed and hasattr(self, "_reader"):
            self._reader.close()  # type: ignore[no-untyped-call]
            self._file.close()
        super().close()


class ZipStream(_Stream):
    """The single member of a zip; zipfile checks its CRC-32 when the member ends."""

    def __init__(self, image: Decodable, tap: Tap | None = None,
                 raw: Readable | None = None) -> None:
        # ``tap`` and ``raw`` go unused: a zip is read by seeking (Format.needs_whole_file).
        super().__init__(image)
        assert image.member is not None
        import zipfile

        try:
            with zipfile.ZipFile(image.path) as zf:  # the member keeps the file open
                self._member = zf.open(image.member)
        except (zipfile.BadZipFile, KeyError, EOFError, ValueError) as e:
            raise ImageError(f"{image.name} is a corrupt or truncated zip file: {e}") from None
        except OSError as e:
            raise ImageError(f"{image.name} cannot be read: {e.strerror or e}") from None

    def _fill(self, out: memoryview) -> int:
        data = self._member.read(len(out))
        out[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed and hasattr(self, "_member"):
            self._member.close()
        super().close()
