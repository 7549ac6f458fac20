"""The format registry: one record per kind of image file, asked instead of switching on names.

The format is found from the first bytes (file names lie: ``foo.img`` is often gzip). Each
:class:`Format` says how it is recognised, which names hint at it, how it is decoded and what
that demands (the whole file first, or a stream), and how its decoded size is learned before
decoding.  A new format is a new record in :data:`REGISTRY`; callers ask the record
(``image.kind.needs_whole_file``), never compare ``image.format`` with a name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from popsicle_py.images.decoders import (
    Bzip2Stream,
    DecoderFactory,
    GzipStream,
    XzStream,
    ZipStream,
    ZstdStream,
)
from popsicle_py.images.sizes import XZ_MAGIC, ZSTD_MAGIC, xz_size, zip_member, zstd_walk

__all__ = [
    "BZIP2",
    "FORMATS",
    "GZIP",
    "HEAD_SIZE",
    "RAW",
    "REGISTRY",
    "XZ",
    "ZIP",
    "ZSTD",
    "Format",
    "Stored",
    "by_name",
    "by_suffix",
    "detect",
    "detect_format",
    "name_warning",
]

#: Bytes at the start of a file that detection looks at.
HEAD_SIZE = 16


@dataclass(frozen=True)
class Stored:
    """An image file as open_image() has it open, handed to a format's ``measure``."""

    path: str  # absolute
    shown: str  # as the user wrote it, for messages
    fd: int
    size: int  # bytes in the file


#: (decoded size or None when unknown, the archive member holding the image or None)
Measured: TypeAlias = "tuple[int | None, str | None]"


@dataclass(frozen=True)
class Format:
    """One kind of image file: how it is recognised, decoded and measured.

    ``name`` is what Image.format, events and JSON carry.  ``matches`` judges the first
    :data:`HEAD_SIZE` bytes.  ``suffixes`` are the file-name endings that say "this format"
    (a mismatch is worth a warning, never a decision).  ``decoder`` is None when the bytes
    are the image.  ``needs_whole_file``: decoded by seeking (a zip's directory is at its end),
    so it cannot be decoded from a download or pipe, nor hashed in the same pass.  ``measure``
    reads the decoded size (and an archive's member) from the file before decoding; None when
    only decoding tells the size.  It raises ImageError for an archive that cannot be used.
    """

    name: str
    matches: Callable[[bytes], bool]
    suffixes: tuple[str, ...] = ()
    decoder: DecoderFactory | None = None
    needs_whole_file: bool = False
    measure: Callable[[Stored], Measured] | None = None

    @property
    def decoded(self) -> bool:
        """True when the file's bytes are decoded into the image (not raw)."""
        return self.decoder is not None

    @property
    def streamed(self) -> bool:
        """True when it can be decoded front to back from a stream (a download, a checksum tap)."""
        return not self.needs_whole_file

    @property
    def size_up_front(self) -> bool:
        """True when the decoded size may be known before decoding (it can still be None)."""
        return self.measure is not None


def _is_gzip(head: bytes) -> bool:
    return head.startswith(b"\x1f\x8b\x08")


def _is_xz(head: bytes) -> bool:
    return head.startswith(XZ_MAGIC)


def _is_bzip2(head: bytes) -> bool:
    return len(head) >= 4 and head[:3] == b"BZh" and head[3:4] in b"123456789"


def _is_zstd(head: bytes) -> bool:
    if len(head) >= 4:
        magic = int.from_bytes(head[:4], "little")
        # pzstd and the seekable format start with a skippable frame (0x184D2A50..5F).
        if magic == ZSTD_MAGIC or magic & 0xFFFFFFF0 == 0x184D2A50:
            return True
    return False


def _is_zip(head: bytes) -> bool:
    return head.startswith((b"PK\x03\x04", b"PK\x05\x06"))  # a local header, or an empty archive


def _anything(head: bytes) -> bool:
    return True


def _zip_measure(f: Stored) -> Measured:
    member, size = zip_member(f.path, f.shown)
    return size, member


RAW = Format("raw", _anything, measure=lambda f: (f.size, None))
GZIP = Format("gzip", _is_gzip, (".gz",), GzipStream)
XZ = Format("xz", _is_xz, (".xz",), XzStream, measure=lambda f: (xz_size(f.fd, f.size), None))
BZIP2 = Format("bzip2", _is_bzip2, (".bz2",), Bzip2Stream)
ZSTD = Format("zstd", _is_zstd, (".zst", ".zstd"), ZstdStream,
              measure=lambda f: (zstd_walk(f.fd, f.size), None))
ZIP = Format("zip", _is_zip, (".zip",), ZipStream, needs_whole_file=True, measure=_zip_measure)

#: Every known format, in the order detection tries them: raw, which takes anything, last.
REGISTRY: tuple[Format, ...] = (GZIP, XZ, BZIP2, ZSTD, ZIP, RAW)

#: The names, raw first.
FORMATS = (RAW.name, *(f.name for f in REGISTRY if f is not RAW))

_BY_NAME = {f.name: f for f in REGISTRY}
_BY_SUFFIX = {suffix: f for f in REGISTRY for suffix in f.suffixes}


def detect(head: bytes) -> Format:
    """The format the first bytes show; anything unrecognised is a raw image."""
    return next(f for f in REGISTRY if f.matches(head))


def detect_format(head: bytes) -> str:
    """Name the format from the first bytes; anything unrecognised is a raw image."""
    return detect(head).name


def by_name(name: str) -> Format:
    """The record of a format name (Image.format); KeyError for a name no record has."""
    return _BY_NAME[name]


def by_suffix(ext: str) -> Format | None:
    """The format a file-name ending such as ".xz" hints at (any case), if any."""
    return _BY_SUFFIX.get(ext.lower())


def name_warning(shown: str, ext: str, kind: Format) -> str | None:
    """The warning for a name whose ending hints at another format than the bytes show."""
    if by_suffix(ext) in (None, kind):
        return None
    what = "a raw image" if not kind.decoded else f"{kind.name} data"
    return f"{shown} has a {ext} name but holds {what}; using it as {what}"
