"""What a file's first and last bytes say it is: pure judges over bytes, one per question.

Each format has a strict judge (exactly the headers its own tool accepts: ``gzip -t``,
``bzip2 -t``, ``xz -t``), and some a loose one that recognises the same header with a byte
damaged, so that a damaged compressed file is refused instead of being taken for a raw image.
Some formats are known by their end: an Apple disk image by its "koly" trailer, a zip with data
in front of it (a self-extractor) by its end of central directory.
"""

from __future__ import annotations

import struct
import zlib

__all__ = [
    "HEAD_SIZE",
    "TAIL_SIZE",
    "XZ_MAGIC",
    "ZSTD_MAGIC",
    "is_bzip2",
    "is_compress",
    "is_dmg",
    "is_gzip",
    "is_lz4",
    "is_lzip",
    "is_lzma_alone",
    "is_lzop",
    "is_sparse",
    "is_xz",
    "is_zip",
    "is_zip_at_end",
    "is_zstd",
    "near_bzip2",
    "near_gzip",
    "near_lzma",
    "near_xz",
    "near_zstd",
    "xz_unchecked",
    "zstd_unchecked",
]

#: Bytes at the start of a file that detection looks at.
HEAD_SIZE = 16
#: Bytes at the end: a zip's end of central directory with the longest comment, and a DMG's
#: 512-byte trailer.
TAIL_SIZE = 22 + 0xFFFF

XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = 0xFD2FB528  # little-endian at the start of every zstd frame
_ZSTD_BYTES = ZSTD_MAGIC.to_bytes(4, "little")
_BZ_BLOCK = b"\x31\x41\x59\x26\x53\x59"  # pi: a bzip2 block starts here
_BZ_END = b"\x17\x72\x45\x38\x50\x90"  # sqrt(pi): the end of a bzip2 stream


def _same(a: bytes, b: bytes) -> int:
    """How many positions of ``b`` hold the same byte in ``a``."""
    return sum(x == y for x, y in zip(a, b, strict=False))


# --------------------------------------------------------------------------- strict


def is_gzip(head: bytes) -> bool:
    """gzip's magic, method 8 (deflate) and no reserved flag: what ``gzip -t`` accepts."""
    return len(head) >= 4 and head[:3] == b"\x1f\x8b\x08" and not head[3] & 0xE0


def is_xz(head: bytes) -> bool:
    """xz's magic and stream flags whose CRC-32 matches, the first byte being zero."""
    return (head.startswith(XZ_MAGIC) and len(head) >= 12 and head[6] == 0 and head[7] < 16
            and zlib.crc32(head[6:8]) == struct.unpack("<I", head[8:12])[0])


def is_bzip2(head: bytes) -> bool:
    """"BZh", a block size 1-9, then a block or the end of the stream (``bzip2 -t``)."""
    return (len(head) >= 10 and head[:3] == b"BZh" and head[3:4] in b"123456789"
            and head[4:10] in (_BZ_BLOCK, _BZ_END))


def is_zstd(head: bytes) -> bool:
    """A zstd frame, or the skippable frame pzstd and the seekable format start with."""
    if len(head) >= 4:
        magic = int.from_bytes(head[:4], "little")
        if magic == ZSTD_MAGIC or magic & 0xFFFFFFF0 == 0x184D2A50:
            return True
    return False


def is_zip(head: bytes) -> bool:
    """A local file header, or an empty archive."""
    return head.startswith((b"PK\x03\x04", b"PK\x05\x06"))


def is_lzma_alone(head: bytes) -> bool:
    """An LZMA-alone (.lzma) header as liblzma's picky check takes it: properties that fit
    lc/lp/pb, a dictionary of 2^n or 2^n + 2^(n-1) bytes, and a size unknown or below 256 GiB."""
    if len(head) < 13 or head[0] > _LZMA_PROPS_MAX:
        return False
    return _lzma_dictionary_ok(head) and _lzma_size_ok(head)


_LZMA_PROPS_MAX = (4 * 5 + 4) * 9 + 8  # lc <= 8, lp <= 4, pb <= 4
_LZMA_PROPS = 0x5D  # lc=3, lp=0, pb=2: what xz, lzma and 7-Zip write


def _lzma_dictionary_ok(head: bytes) -> bool:
    dictionary = int.from_bytes(head[1:5], "little")
    if dictionary < 4096:
        return False
    top = 1 << (dictionary.bit_length() - 1)
    return dictionary in (top, top + (top >> 1))


def _lzma_size_ok(head: bytes) -> bool:
    size = int.from_bytes(head[5:13], "little")
    return size == 0xFFFF_FFFF_FFFF_FFFF or 0 < size < 1 << 38


def is_lzip(head: bytes) -> bool:
    return head.startswith(b"LZIP")


def is_lz4(head: bytes) -> bool:
    return head.startswith((b"\x04\x22\x4d\x18", b"\x02\x21\x4c\x18"))


def is_lzop(head: bytes) -> bool:
    return head.startswith(b"\x89LZO\x00\r\n\x1a\n")


def is_compress(head: bytes) -> bool:
    """Unix compress (.Z)."""
    return head.startswith(b"\x1f\x9d")


def is_sparse(head: bytes) -> bool:
    """An Android sparse image (what fastboot flashes)."""
    return head.startswith(b"\x3a\xff\x26\xed")


def xz_unchecked(head: bytes) -> bool:
    """An xz stream without an integrity check (``xz --check=none``): damage to its stored
    (incompressible) chunks decodes without an error."""
    return is_xz(head) and head[7] & 0x0F == 0


def zstd_unchecked(head: bytes) -> bool:
    """A zstd frame without its content checksum (``zstd --no-check``, python-zstandard's
    default): damage to its raw blocks and literals decodes without an error.  A file that
    starts with a skippable frame is not judged (its frames are not read here)."""
    return (len(head) >= 5 and int.from_bytes(head[:4], "little") == ZSTD_MAGIC
            and not head[4] & 0x04)


# --------------------------------------------------------------------------- at the end


def is_dmg(tail: bytes) -> bool:
    """An Apple disk image: its 512-byte "koly" trailer, version 4, at the very end."""
    if len(tail) < 512:
        return False
    koly = tail[-512:]
    return koly[:4] == b"koly" and struct.unpack(">II", koly[4:12]) == (4, 512)


def is_zip_at_end(tail: bytes) -> bool:
    """A zip's end of central directory ending exactly at the end of the file (with its
    comment), its directory before it: a zip even with other data in front of it."""
    at = tail.rfind(b"PK\x05\x06")
    while at >= 0:
        record = tail[at:at + 22]
        if len(record) == 22:
            _, disk, cd_disk, _, entries, cd_size, _, comment = struct.unpack("<IHHHHIIH", record)
            if (at + 22 + comment == len(tail) and disk == cd_disk == 0 and entries
                    and cd_size >= 46 * entries):
                return True
        at = tail.rfind(b"PK\x05\x06", 0, at)
    return False


# --------------------------------------------------------------------------- damaged headers


def near_gzip(head: bytes) -> bool:
    """gzip's magic with another method or reserved flags (``gzip -t``: "unknown method",
    "has flags"), or with one of its two magic bytes damaged."""
    if len(head) < 10:
        return False
    if head[:2] == b"\x1f\x8b":
        return True
    return (_same(head[:3], b"\x1f\x8b\x08") == 2 and not head[3] & 0xE0
            and (head[9] <= 13 or head[9] == 255))


def near_xz(head: bytes) -> bool:
    """An xz stream header with its magic, flags or their CRC damaged: most of it still right."""
    if len(head) < 12:
        return False
    crc_ok = zlib.crc32(head[6:8]) == struct.unpack("<I", head[8:12])[0]
    magic = _same(head[:6], XZ_MAGIC)
    return magic >= 5 or (magic >= 3 and crc_ok)


def near_bzip2(head: bytes) -> bool:
    """bzip2 with a block size other than 1-9 (``bzip2 -t``: "bad magic number") or a damaged
    "BZh" before an intact block start."""
    if len(head) < 10:
        return False
    if head[:3] == b"BZh":
        return True
    return head[4:10] in (_BZ_BLOCK, _BZ_END) and _same(head[:3], b"BZh") >= 2


def near_lzma(head: bytes) -> bool:
    """An LZMA-alone header with one of its three fields damaged, the other two intact: two
    of the usual properties (0x5D), a dictionary that fits, and a size that fits or is
    unknown (all 0xFF) but for a byte or two."""
    if len(head) < 13 or is_lzma_alone(head):
        return False
    size = _lzma_size_ok(head) or head[5:13].count(0xFF) >= 6
    return sum((head[0] == _LZMA_PROPS, _lzma_dictionary_ok(head), size)) >= 2


def near_zstd(head: bytes) -> bool:
    """A zstd frame magic with one byte damaged."""
    return len(head) >= 5 and _same(head[:4], _ZSTD_BYTES) == 3
