"""Source images as people download them: raw or compressed, with optional checksums.

The format is found from the first bytes (file names lie: ``foo.img`` is often gzip). Compressed
images are decompressed on the fly, never to a temporary file, and every way a stream can end
early or be damaged becomes an :class:`ImageError` that names the image and the uncompressed
offset reached, so a bad download can never look like a successful flash.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import lzma
import os
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, TypeAlias

import zstandard
from zlib_ng import zlib_ng

from popsicle_py import files
from popsicle_py.errors import Cancelled, Refused

__all__ = [
    "Checksum",
    "ChecksumCancelled",
    "Image",
    "ImageError",
    "choose_sidecar",
    "detect_format",
    "find_sidecar",
    "new_hasher",
    "open_image",
    "open_stream",
    "parse_checksum_option",
    "read_head",
    "verify_checksum",
]

FORMATS = ("raw", "gzip", "xz", "bzip2", "zstd", "zip")

_READ_SIZE = 1 << 20  # compressed bytes per read: large enough to amortise the Python overhead
_HASH_READ_SIZE = 8 << 20  # per read when hashing the download
_HEAD_SIZE = 16

_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = 0xFD2FB528
_NAME_HINTS = {
    ".gz": "gzip",
    ".xz": "xz",
    ".bz2": "bzip2",
    ".zst": "zstd",
    ".zstd": "zstd",
    ".zip": "zip",
}
_STREAM_MAGIC = {"gzip": b"\x1f\x8b", "xz": _XZ_MAGIC, "bzip2": b"BZh"}
_ZIP_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}
_ZIP_METHOD_NAMES = {9: "Deflate64", 93: "zstd", 95: "xz", 98: "PPMd", 99: "AES encryption"}


class ImageError(Refused):
    """A problem with the source image or its checksum, as one line the user can act on."""


class ChecksumCancelled(Cancelled, ImageError):
    """verify_checksum() stopped because cancel() said so; not a verdict on the image.

    The one Cancelled of the tree, and an ImageError, so that callers that refuse on image
    problems before writing also stop cleanly on it.
    """


def detect_format(head: bytes) -> str:
    """Name the format from the first bytes; anything unrecognised is a raw image."""
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head.startswith(_XZ_MAGIC):
        return "xz"
    if len(head) >= 4 and head[:3] == b"BZh" and head[3:4] in b"123456789":
        return "bzip2"
    if len(head) >= 4:
        magic = int.from_bytes(head[:4], "little")
        # pzstd and the seekable format start with a skippable frame (0x184D2A50..5F).
        if magic == _ZSTD_MAGIC or magic & 0xFFFFFFF0 == 0x184D2A50:
            return "zstd"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a local header, or an empty archive
        return "zip"
    return "raw"


@dataclass(frozen=True)
class Image:
    """One source image; cheap to keep around, and open() can be called once per pass."""

    path: str
    format: str
    size: int | None
    file_size: int
    member: str | None = None
    warning: str | None = None  # e.g. named .xz but not xz inside; worth showing, not fatal

    @property
    def seekable_raw(self) -> bool:
        """True when offsets in the stream are offsets in the file (exact os.pread allowed)."""
        return self.format == "raw"

    @property
    def compressed(self) -> bool:
        """True when the stream is decoded: no fileno(), no positional reads."""
        return self.format != "raw"

    def open(self, tap: ChecksumTap | None = None) -> io.RawIOBase:
        """A fresh stream at offset 0: the file itself for raw, a decompressor otherwise.

        Compressed streams fill readinto()'s buffer completely except at the end, and raise
        ImageError (never a short EOF) when the data is truncated or corrupt.  With ``tap``,
        every byte of the file as stored (compressed or not) is hashed as it is read, so the
        checksum vouches for the very bytes that were decoded and written.
        """
        if self.format == "raw":
            raw: io.RawIOBase = _open_file(self.path, self.path, tap)
            return raw
        if self.format == "zip":
            return _ZipStream(self)
        if self.format == "zstd":
            return _ZstdStream(self, tap)
        return _ChainedStream(self, tap)

    @property
    def tappable(self) -> bool:
        """Whether :meth:`open` can hash the file in the same pass (a zip is read by seeking)."""
        return self.format != "zip"

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the image at ``offset``: by position when raw, else decoded again.

        For repairs of a few bad buckets; a compressed image is decompressed up to them.
        """
        with self.open() as stream:
            if self.seekable_raw:
                return os.pread(stream.fileno(), length, offset)
            return read_decoded(stream, offset, length)


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


def read_head(image: Image, length: int) -> bytes:
    """The first ``length`` bytes of the decoded image, fewer when the image is shorter.

    For a compressed image this decodes only as far as needed (the sanity check looks at the
    start of what would be written, not at the compressed file).
    """
    chunks: list[bytes] = []
    got = 0
    try:
        with image.open() as stream:
            while got < length:
                data = stream.read(length - got)
                if not data:
                    break
                chunks.append(data)
                got += len(data)
    except OSError as e:
        raise ImageError(f"{image.path} cannot be read: {e.strerror or e}") from None
    return b"".join(chunks)


def open_stream(raw: BinaryIO, fmt: str, name: str, size: int | None = None) -> BinaryIO:
    """Decode an already open stream of ``fmt`` data (a download) exactly as open() decodes a file.

    ``name`` is used in messages; ``size``, when known, is checked like a header's size.  A zip
    needs its directory at the end of the file, so it cannot be read from a stream.
    """
    image = Image(name, fmt, size, 0)
    if fmt == "raw":
        return raw
    if fmt == "zip":
        raise ImageError(f"{name} is a zip file, which cannot be read as a stream")
    if fmt == "zstd":
        return _ZstdStream(image, raw=raw)  # type: ignore[return-value]
    return _ChainedStream(image, raw=raw)  # type: ignore[return-value]


# --------------------------------------------------------------------------- opening


class ChecksumTap:
    """Hashes the image file as stored, as the write pass reads it; vouches at the end.

    The file must be read from its start, in order, to its end: a seek elsewhere (or a read
    that was never finished) means the hash covers other bytes, and nothing is vouched for.
    """

    def __init__(self, checksum: Checksum, *, checked_before: bool = True) -> None:
        self.checksum = checksum
        self.checked_before = checked_before  # a checksum pass matched before this one
        self._hasher = new_hasher(checksum)
        self._file: _HashingFile | None = None

    def wrap(self, raw: io.FileIO) -> _HashingFile:
        self._file = _HashingFile(raw, self._hasher)
        return self._file

    def vouch(self) -> None:
        """Hash what the decoder left unread, then compare; raises ChecksumMismatch."""
        from popsicle_py.errors import ChecksumMismatch

        f = self._file
        if f is None or f.broken:
            raise ChecksumMismatch(self.checksum.algo)
        f.drain()
        if self._hasher.hexdigest() != self.checksum.hexdigest:
            raise ChecksumMismatch(self.checksum.algo, checked_before=self.checked_before)


class _HashingFile(io.RawIOBase):
    """A raw file whose sequential reads are hashed; used by :class:`ChecksumTap`."""

    def __init__(self, raw: io.FileIO, hasher: Any) -> None:
        super().__init__()
        self._raw = raw
        self._hasher = hasher
        self._pos = 0
        self.broken = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        target = self._raw.seek(offset, whence)
        if target != self._pos:
            self.broken = True
        self._pos = target
        return target

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = self._raw.readinto(view) or 0
        self._hasher.update(view[:n])
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._hasher.update(data)
        self._pos += len(data)
        return data

    def drain(self) -> None:
        if self.closed or self._raw.closed:
            with open(self._raw.name, "rb", buffering=0) as again:
                again.seek(self._pos)
                while chunk := again.read(_HASH_READ_SIZE):
                    self._hasher.update(chunk)
                    self._pos += len(chunk)
            return
        while chunk := self.read(_HASH_READ_SIZE):
            pass

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_file(path: str, shown: str, tap: ChecksumTap | None = None) -> Any:
    """Open for reading, turning OS errors into one-line ImageErrors."""
    try:
        raw = open(path, "rb", buffering=0)  # noqa: SIM115 (the caller closes it)
        return raw if tap is None else tap.wrap(raw)
    except FileNotFoundError:
        raise ImageError(f"{shown} does not exist") from None
    except IsADirectoryError:
        raise ImageError(f"{shown} is a directory, not an image") from None
    except PermissionError:
        raise ImageError(f"{shown} cannot be read: permission denied") from None
    except OSError as e:
        raise ImageError(f"{shown} cannot be opened: {e.strerror or e}") from None


def open_image(path: str) -> Image:
    """Check the file, detect its format by magic bytes and learn its size where possible."""
    shown = path
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{shown} does not exist") from None
    except OSError as e:
        raise ImageError(f"{shown} cannot be opened: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{shown} is a directory, not an image")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        # A pipe could be read only once, but every pass (checksum, write, verify) reopens it.
        raise ImageError(f"{shown} is not a regular file or block device")
    with _open_file(path, shown) as f:
        file_size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(f.fileno(), 0, os.SEEK_END)
        if file_size == 0:
            raise ImageError(f"{shown} is empty")
        try:
            head = os.pread(f.fileno(), _HEAD_SIZE, 0)
            fmt = detect_format(head)
            size: int | None = None
            member = None
            if fmt == "raw":
                size = file_size
            elif fmt == "xz":
                size = _xz_size(f.fileno(), file_size)
            elif fmt == "zstd":
                size = _zstd_walk(f.fileno(), file_size)
        except OSError as e:
            raise ImageError(f"{shown} cannot be read: {e.strerror or e}") from None
    if fmt == "zip":
        member, size = _zip_member(path, shown)
    warning = None
    ext = os.path.splitext(path)[1]
    if _NAME_HINTS.get(ext.lower(), fmt) != fmt:
        what = "a raw image" if fmt == "raw" else f"{fmt} data"
        warning = f"{shown} has a {ext} name but holds {what}; using it as {what}"
    return Image(path, fmt, size, file_size, member, warning)


def _zip_member(path: str, shown: str) -> tuple[str, int]:
    """The single image inside a zip; several files would make the choice a guess."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise ImageError(f"{shown} is a corrupt or truncated zip file: {e}") from None
    except OSError as e:
        raise ImageError(f"{shown} cannot be read: {e.strerror or e}") from None
    # Finder adds __MACOSX/ resource forks to every zip it makes; they are never the image.
    files = [i for i in infos if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
    if not files:
        raise ImageError(f"{shown} is a zip file with no files in it")
    if len(files) > 1:
        names = ", ".join(i.filename for i in files[:3]) + (", ..." if len(files) > 3 else "")
        raise ImageError(
            f"{shown} is a zip file with {len(files)} files ({names}); "
            "it must hold exactly one image (unzip it and pick the image)"
        )
    info = files[0]
    if info.flag_bits & 0x1:
        raise ImageError(f"{shown}: {info.filename} in the zip is encrypted; unzip it first")
    if info.compress_type not in _ZIP_METHODS:
        name = _ZIP_METHOD_NAMES.get(info.compress_type, f"method {info.compress_type}")
        raise ImageError(
            f"{shown}: {info.filename} in the zip uses {name} compression, which cannot be "
            "read on the fly; unzip it first"
        )
    return info.filename, info.file_size


# --------------------------------------------------------------------------- xz size


def _xz_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(9):
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise ValueError("bad xz varint")


def _xz_size(fd: int, file_size: int) -> int | None:
    """Uncompressed size from the index of every stream, read from the end; None if unreadable.

    liblzma checks the same index while decoding, so a wrong answer here cannot go unnoticed.
    """
    end = file_size
    total = 0
    try:
        while end > 0:
            if end % 4 or end < 24:
                return None
            footer = os.pread(fd, 12, end - 12)
            if footer[8:] == b"\0\0\0\0":  # stream padding
                end -= 4
                continue
            if len(footer) != 12 or footer[10:] != b"YZ":
                return None
            if zlib.crc32(footer[4:10]) != struct.unpack("<I", footer[:4])[0]:
                return None
            index_size = (struct.unpack("<I", footer[4:8])[0] + 1) * 4
            index_start = end - 12 - index_size
            if index_start < 12 or index_size > 64 << 20:
                return None
            index = os.pread(fd, index_size, index_start)
            if len(index) != index_size or index[0] != 0:
                return None
            if zlib.crc32(index[:-4]) != struct.unpack("<I", index[-4:])[0]:
                return None
            count, pos = _xz_varint(index, 1)
            blocks = 0
            for _ in range(count):
                unpadded, pos = _xz_varint(index, pos)
                uncompressed, pos = _xz_varint(index, pos)
                blocks += (unpadded + 3) & ~3
                total += uncompressed
            start = index_start - blocks - 12
            if start < 0:
                return None
            header = os.pread(fd, 12, start)
            if header[:6] != _XZ_MAGIC or header[6:8] != footer[8:10]:
                return None
            end = start
    except (ValueError, IndexError, struct.error):
        return None
    return total


# --------------------------------------------------------------------------- zstd layout


class _ZstdLayout:
    """Walks zstd frame and block headers: the decoder alone cannot tell a cut file from a whole
    one (zstandard's stream_reader returns a clean EOF when the input stops mid-frame).
    """

    def __init__(self) -> None:
        self.size: int | None = 0  # sum of frame content sizes; None once one is unknown
        self.at_boundary = True  # between frames: the only place a complete file can end
        self.problem: str | None = None

    def steps(self) -> Generator[tuple[int, bool], bytes | None, None]:
        """Yield (n, want): want=True -> send the next n bytes; False -> skip them (send None)."""
        while True:
            self.at_boundary = True
            head = yield 4, True
            self.at_boundary = False
            assert head is not None
            magic = int.from_bytes(head, "little")
            if magic & 0xFFFFFFF0 == 0x184D2A50:
                skippable = yield 4, True
                assert skippable is not None
                yield int.from_bytes(skippable, "little"), False
                continue
            if magic != _ZSTD_MAGIC:
                self.problem = "unknown zstd frame magic"
                return
            fhd_b = yield 1, True
            assert fhd_b is not None
            fhd = fhd_b[0]
            if fhd & 0x08:
                self.problem = "reserved bit set in a zstd frame header"
                return
            fcs_flag, single, checksum, did_flag = fhd >> 6, fhd >> 5 & 1, fhd >> 2 & 1, fhd & 3
            fcs_size = (1 if single else 0, 2, 4, 8)[fcs_flag]
            rest_size = (0 if single else 1) + (0, 1, 2, 4)[did_flag] + fcs_size
            rest = yield rest_size, True  # never empty: a window descriptor or a content size
            assert rest is not None
            if fcs_size:
                fcs = int.from_bytes(rest[rest_size - fcs_size :], "little")
                if fcs_size == 2:
                    fcs += 256
                if self.size is not None:
                    self.size += fcs
            else:
                self.size = None
            while True:
                block = yield 3, True
                assert block is not None
                header = int.from_bytes(block, "little")
                last, kind, length = header & 1, header >> 1 & 3, header >> 3
                if kind == 3:
                    self.problem = "reserved zstd block type"
                    return
                yield (1 if kind == 1 else length), False
                if last:
                    break
            if checksum:
                yield 4, False


def _zstd_walk(fd: int, file_size: int) -> int | None:
    """Uncompressed size of a zstd file if every frame states it; None otherwise.

    Reads a few bytes per 128 KiB block with pread, so it costs little even on large files.
    """
    layout = _ZstdLayout()
    steps = layout.steps()
    pos = 0
    try:
        n, want = next(steps)
        while pos < file_size or (n == 0 and not want):
            data = None
            if want:
                data = os.pread(fd, n, pos)
                if len(data) < n:
                    return None
            pos += n
            if pos > file_size:
                return None
            n, want = steps.send(data)
    except StopIteration:
        return None
    return layout.size if pos == file_size and layout.at_boundary else None


# --------------------------------------------------------------------------- streams


class _Corrupt(Exception):
    """Internal: a stream-level problem found by our own checks rather than by a decoder."""


_DECODE_ERRORS: tuple[type[BaseException], ...] = (  # type: ignore[assignment]
    EOFError,
    OSError,
    lzma.LZMAError,
    zlib.error,
    zlib_ng.error,
    zstandard.ZstdError,
    zipfile.BadZipFile,
    _Corrupt,
)


class _Stream(io.RawIOBase):
    """Common part of the decompressing streams: full-buffer reads, offsets, error wording."""

    def __init__(self, image: Image) -> None:
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
        except _DECODE_ERRORS as e:
            self._error = self._wrap(e)
            raise self._error from e
        return filled

    def _wrap(self, e: BaseException) -> ImageError:
        where = f"at byte {self._pos} of the uncompressed image"
        if isinstance(e, OSError) and e.errno is not None:  # the disk, not the data
            return ImageError(f"{self._image.path} could not be read ({where}): {e.strerror or e}")
        if isinstance(e, EOFError):
            reason = "the compressed data ends early (incomplete download?)"
        else:
            reason = str(e) or type(e).__name__
        return ImageError(f"{self._image.path} is corrupt or truncated ({where}): {reason}")

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        buf = bytearray(size)
        n = self.readinto(buf)
        del buf[n:]
        return bytes(buf)

    def readall(self) -> bytes:
        chunks = []
        while chunk := self.read(_READ_SIZE * 4):
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

    def __init__(self, image: Image, tap: ChecksumTap | None = None,
                 raw: Any = None) -> None:
        super().__init__(image)
        self._file = raw if raw is not None else _open_file(image.path, image.path, tap)
        self._pending = b""
        self._decoder: _Decoder | None = None
        self._streams = 0

    def _new_decoder(self) -> _Decoder:
        if self._image.format == "gzip":
            # zlib-ng inflates about 2.5x faster than the stdlib's zlib (bench/bench_images.py);
            # like zlib it checks the CRC-32 and length of every member.
            return zlib_ng.decompressobj(16 + zlib_ng.MAX_WBITS)  # type: ignore[return-value]
        if self._image.format == "xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        return bz2.BZ2Decompressor()

    def _fill(self, out: memoryview) -> int:
        data = self._produce(len(out))
        out[: len(data)] = data
        return len(data)

    def _start_stream(self) -> bool:
        """Skip zero padding; False at a clean end, else make sure another stream follows."""
        magic = _STREAM_MAGIC[self._image.format]
        while True:
            self._pending = self._pending.lstrip(b"\0")
            if len(self._pending) >= len(magic):
                break
            more = self._file.read(_READ_SIZE)
            if not more:
                if not self._pending:
                    return False
                break
            self._pending += more
        if self._streams and not self._pending.startswith(magic):
            raise _Corrupt(f"unexpected data after the end of compressed stream {self._streams}")
        self._decoder = self._new_decoder()
        self._streams += 1
        return True

    def _produce(self, limit: int) -> bytes:
        while True:
            if self._decoder is None and not self._start_stream():
                return b""  # clean end after a complete stream
            dec = self._decoder
            assert dec is not None
            if isinstance(dec, (lzma.LZMADecompressor, bz2.BZ2Decompressor)):
                data = b""
                if dec.needs_input:
                    data = self._pending or self._file.read(_READ_SIZE)
                    self._pending = b""
                    if not data:
                        raise EOFError
                out = dec.decompress(data, limit)
                if dec.eof:
                    self._pending = dec.unused_data
            else:
                if not self._pending:
                    self._pending = self._file.read(_READ_SIZE)
                    if not self._pending:
                        raise EOFError
                out = dec.decompress(self._pending, limit)
                # At the end zlib reports the leftover in both; unused_data is the one to keep.
                self._pending = dec.unused_data if dec.eof else dec.unconsumed_tail
            if dec.eof:
                self._decoder = None
            if out:
                return out

    def close(self) -> None:
        if not self.closed and hasattr(self, "_file"):
            self._file.close()
        super().close()


class _Tap:
    """Passes the compressed bytes to zstandard while a _ZstdLayout watches the frame structure."""

    def __init__(self, raw: BinaryIO | io.FileIO, layout: _ZstdLayout) -> None:
        self._raw = raw
        self._layout = layout
        self._steps: Generator[tuple[int, bool], bytes | None, None] | None = layout.steps()
        self._need, self._want = next(self._steps)
        self._buf = bytearray()

    def _send(self, value: bytes | None) -> None:
        assert self._steps is not None
        self._need, self._want = self._steps.send(value)
        while self._need == 0:  # an empty skippable frame or raw block
            self._need, self._want = self._steps.send(None)

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size if size and size > 0 else _READ_SIZE)
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


class _ZstdStream(_Stream):
    """zstd through zstandard's stream_reader, with truncation detected by _ZstdLayout."""

    def __init__(self, image: Image, tap: ChecksumTap | None = None,
                 raw: Any = None) -> None:
        super().__init__(image)
        self._file = raw if raw is not None else _open_file(image.path, image.path, tap)
        self._layout = _ZstdLayout()
        self._tap = _Tap(self._file, self._layout)
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            self._tap,  # type: ignore[arg-type]  # anything with read() will do
            read_size=_READ_SIZE, read_across_frames=True, closefd=False,
        )

    def _fill(self, out: memoryview) -> int:
        return self._reader.readinto(out)

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


class _ZipStream(_Stream):
    """The single member of a zip; zipfile checks its CRC-32 when the member ends."""

    def __init__(self, image: Image) -> None:
        super().__init__(image)
        assert image.member is not None
        try:
            with zipfile.ZipFile(image.path) as zf:  # the member keeps the file open
                self._member = zf.open(image.member)
        except (zipfile.BadZipFile, KeyError, EOFError, ValueError) as e:
            raise ImageError(f"{image.path} is a corrupt or truncated zip file: {e}") from None
        except OSError as e:
            raise ImageError(f"{image.path} cannot be read: {e.strerror or e}") from None

    def _fill(self, out: memoryview) -> int:
        data = self._member.read(len(out))
        out[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed and hasattr(self, "_member"):
            self._member.close()
        super().close()


# --------------------------------------------------------------------------- checksums

_HEX_LENGTHS = {"sha1": 40, "sha256": 64, "sha512": 128, "blake2b": 128}
_HEX = re.compile(r"[0-9a-fA-F]+")


@dataclass(frozen=True)
class Checksum:
    """An expected digest of the file as downloaded, and where the expectation came from."""

    algo: str
    hexdigest: str
    source: str


def new_hasher(checksum: Checksum) -> Any:  # hashlib's objects share no public type
    """A fresh hash object of the checksum's algorithm (and digest length, for blake2b)."""
    if checksum.algo == "blake2b":  # b2sum -l N gives shorter digests
        return hashlib.blake2b(digest_size=len(checksum.hexdigest) // 2)
    return hashlib.new(checksum.algo)


def _valid_hex(algo: str, hexdigest: str) -> bool:
    if not _HEX.fullmatch(hexdigest):
        return False
    if algo == "blake2b":
        return 2 <= len(hexdigest) <= 128 and len(hexdigest) % 2 == 0
    return len(hexdigest) == _HEX_LENGTHS[algo]


def parse_checksum_option(sha256: str | None, checksum: str | None) -> Checksum | None:
    """Turn --sha256 HEX / --checksum ALGO:HEX into a Checksum, refusing anything malformed."""
    if sha256 is not None and checksum is not None:
        raise ImageError("use either --sha256 or --checksum, not both")
    if sha256 is not None:
        value = sha256.strip()
        if not _valid_hex("sha256", value):
            raise ImageError(f"--sha256: expected 64 hexadecimal digits, got {_clip(value)!r}")
        return Checksum("sha256", value.lower(), "--sha256")
    if checksum is None:
        return None
    algo, sep, value = checksum.strip().partition(":")
    algo = algo.strip().lower().replace("-", "")
    value = value.strip()
    if not sep or not algo:
        raise ImageError(
            f"--checksum: expected ALGO:HEX (e.g. sha256:<hex>), got {_clip(checksum)!r}"
        )
    if algo not in _HEX_LENGTHS:
        raise ImageError(
            f"--checksum: unknown algorithm {algo} (use sha1, sha256, sha512 or blake2b)"
        )
    if not _valid_hex(algo, value):
        want = "an even number of up to 128" if algo == "blake2b" else str(_HEX_LENGTHS[algo])
        raise ImageError(
            f"--checksum: a {algo} checksum is {want} hexadecimal digits, got {_clip(value)!r}"
        )
    return Checksum(algo, value.lower(), "--checksum")


def _clip(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


# "HEX  name" / "HEX *name" (GNU, '\' prefix = escaped name), a bare "HEX", and
# "SHA256 (name) = HEX" (BSD, and GNU --tag).
_GNU_LINE = re.compile(r"(\\?)([0-9a-fA-F]+)(?:[ \t]+\*?(.*))?")
_BSD_LINE = re.compile(
    r"(\\?)(SHA1|SHA256|SHA512|BLAKE2b(?:-\d+)?) ?\((.*)\) ?= ?([0-9a-fA-F]+)", re.I
)


def _unescape(name: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m[1], m[1]), name)


def _sidecar_entries(text: str, algo: str) -> Iterator[tuple[str, str, str | None]]:
    """(algo, hex, name or None) for each usable line; lines of other shapes are ignored."""
    for line in text.splitlines():
        line = line.strip()
        if m := _BSD_LINE.fullmatch(line):
            escaped, tag, name, hexdigest = m.groups()
            line_algo = tag.lower().split("-")[0]
            if _valid_hex(line_algo, hexdigest):
                yield line_algo, hexdigest.lower(), _unescape(name) if escaped else name
        elif m := _GNU_LINE.fullmatch(line):
            escaped, hexdigest, name = m.groups()
            if _valid_hex(algo, hexdigest):
                if name is not None:
                    name = _unescape(name) if escaped else name
                yield algo, hexdigest.lower(), name


def _read_sidecar(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(16 << 20).decode("utf-8", errors="replace")
    except OSError as e:
        raise ImageError(f"checksum file {path} cannot be read: {e.strerror or e}") from None


def _pick(entries: list[tuple[str, str, str | None]], sidecar: str, base: str) -> Checksum | None:
    named = [e for e in entries if e[2] in (base, "./" + base)]
    found = {(a, h) for a, h, _ in named}
    if len(found) > 1:
        raise ImageError(f"checksum file {sidecar} lists {base} with different checksums")
    if found:
        algo, hexdigest = found.pop()
        return Checksum(algo, hexdigest, sidecar)
    return None


def find_sidecar(path: str) -> Checksum | None:
    """The checksum published next to the image file, if there is one that applies to it."""
    path = os.path.abspath(path)
    folder, base = os.path.split(path)
    return choose_sidecar(base, lambda name: os.path.join(folder, name),
                          lambda p: _read_sidecar(p) if os.path.isfile(p) else None)


def choose_sidecar(base: str, beside: Callable[[str], str],
                   read: Callable[[str], str | None]) -> Checksum | None:
    """The published checksum for ``base`` among the files ``beside(name)``, read by ``read``.

    IMAGE.sha256 / IMAGE.sha256sum (then the .sha512 variants) belong to the image by name, so
    one that holds no usable checksum is an error rather than a silent skip; a SHA256SUMS (or
    SHA512SUMS) that does not list the image simply does not apply.  ``read`` returns None for
    a file that is not there, so the same rules serve a folder and a web server.
    """
    for algo in ("sha256", "sha512"):
        for suffix in (f".{algo}", f".{algo}sum"):
            sidecar = beside(base + suffix)
            text = read(sidecar)
            if text is None:
                continue
            entries = list(_sidecar_entries(text, algo))
            picked = _pick(entries, sidecar, base)
            if picked:
                return picked
            unnamed = {(a, h) for a, h, n in entries if n is None}
            # A single entry under another name: renamed downloads keep their sidecar's text.
            candidates = unnamed or (
                {(a, h) for a, h, _ in entries} if len(entries) == 1 else set()
            )
            if len(candidates) == 1:
                algo_found, hexdigest = candidates.pop()
                return Checksum(algo_found, hexdigest, sidecar)
            raise ImageError(f"checksum file {sidecar} holds no usable {algo} checksum for {base}")
        sums = beside(f"{algo.upper()}SUMS")
        text = read(sums) if sums != beside(base) else None
        if text is not None:
            picked = _pick(list(_sidecar_entries(text, algo)), sums, base)
            if picked:
                return picked
    return None


def decompress_to(image: Image, path: str, cancel: Callable[[], bool],
                  progress: Callable[[int], None]) -> int | None:
    """Write the image's decoded bytes to a new file at ``path``; their count, None if cancelled.

    ImageError when the image is corrupt or the file cannot be written.
    """
    done = 0
    buf = memoryview(bytearray(4 << 20))
    try:
        with image.open() as source, files.create_regular(path) as out:
            while True:
                if cancel():
                    return None
                n = source.readinto(buf) or 0
                if not n:
                    return done
                out.write(buf[:n])
                done += n
                progress(done)
    except OSError as exc:
        raise ImageError(f"cannot decompress {image.path} to {path}: "
                         f"{exc.strerror or exc}") from None


def verify_checksum(
    path: str,
    checksum: Checksum,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> None:
    """Hash the file as downloaded, in large sequential reads that also warm the page cache."""
    hasher = new_hasher(checksum)
    buf = bytearray(_HASH_READ_SIZE)
    view = memoryview(buf)
    done = 0
    with _open_file(path, path) as f:
        fd = f.fileno()
        try:
            total = os.fstat(fd).st_size or os.lseek(fd, 0, os.SEEK_END)
            os.lseek(fd, 0, os.SEEK_SET)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while True:
                if cancel is not None and cancel():
                    raise ChecksumCancelled(f"checksum of {path} cancelled")
                n = f.readinto(view)
                if not n:
                    break
                hasher.update(view[:n])
                done += n
                if progress is not None:
                    progress(done, total)
        except OSError as e:
            raise ImageError(
                f"{path} could not be read (at byte {done}): {e.strerror or e}"
            ) from None
    actual = hasher.hexdigest()
    if actual != checksum.hexdigest:
        raise ImageError(
            f"checksum mismatch for {path}: expected {checksum.algo} {checksum.hexdigest} "
            f"(from {checksum.source}), got {actual}"
        )
