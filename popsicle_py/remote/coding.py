"""Content-Encoding on the wire: what a server sent encoded although it was asked for the file
as it is (``Accept-Encoding: identity``: Range offsets are offsets in the file).

An image's body so sent is refused unless its bytes are the file's own (a ``.gz`` file sent
with ``Content-Encoding: gzip``); a sums or signature file is small and decoded.
"""

from __future__ import annotations

import contextlib
import posixpath
import urllib.parse
import zlib
from collections.abc import Mapping

from popsicle_py.images import ImageError, by_suffix
from popsicle_py.signatures import SIDECAR_LIMIT

__all__ = ["CODED_FILES", "coding", "decoded_small", "encoded", "the_files_own"]


#: The format an image's body shows when the server sent it with this Content-Encoding
#: although none was asked for: the file itself is compressed so (Apache's ``AddEncoding
#: gzip .gz``), and the bytes are the file's.  Any other coding changes the bytes.
CODED_FILES = {"gzip": "gzip", "x-gzip": "gzip", "zstd": "zstd"}


def the_files_own(value: str, shown: str, urls: tuple[str, ...]) -> bool:
    """True when a body sent with Content-Encoding ``value``, whose bytes show the format
    ``shown``, is the file itself: the coding is the format of a compressed file, and the
    URL's name (before or after redirects) does not say the file is something else.  A
    ``disk.img`` sent so was compressed on the way by a server that ignored
    ``Accept-Encoding: identity``: its bytes are not the file's, and the file's published
    checksum would be compared with them (a name without an ending cannot tell: taken)."""
    if CODED_FILES.get(value) != shown:
        return False
    endings = {posixpath.splitext(urllib.parse.urlsplit(u).path)[1].lower() for u in urls}
    endings.discard("")
    return not endings or any((f := by_suffix(e)) is not None and f.name == shown
                              for e in endings)


def coding(headers: Mapping[str, str]) -> str | None:
    """The answer's Content-Encoding, lower case; None for none (or identity)."""
    value = (headers.get("Content-Encoding") or "").strip().lower()
    return None if value in ("", "identity") else value


def encoded(url: str, value: str) -> str:
    """The words for a body sent encoded (the caller says what follows)."""
    return (f"{url}: the server sent it encoded (Content-Encoding: {value}) though it was "
            "asked for the file as it is (Accept-Encoding: identity): those bytes are not "
            "the file's")


def decoded_small(data: bytes, headers: Mapping[str, str], url: str) -> bytes:
    """A sums or signature file the server compressed on the wire, decoded (gzip, deflate):
    read as it came, the checksum it publishes would be lost without a word."""
    value = coding(headers)
    if value is None:
        return data
    if value not in ("gzip", "x-gzip", "deflate"):
        raise ImageError(f"checksum file {encoded(url, value)}; nothing was written")
    for wbits in ((47,) if value != "deflate" else (15, -15)):  # 47: gzip or zlib
        with contextlib.suppress(zlib.error):  # at most what a sums file may be
            return zlib.decompressobj(wbits).decompress(data, SIDECAR_LIMIT + 1)
    raise ImageError(f"checksum file {url}: its {value} encoding (Content-Encoding) does "
                     "not decode; nothing was written")
