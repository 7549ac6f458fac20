"""A compressed file's structure, read without decoding it: the decoded size, and where it may end.

An xz file's index and a zstd file's frame headers state the decoded size, so a flash can show
progress and check the drive is large enough before decoding; the zstd walk also tells a cut file
from a whole one, which the decoder cannot.  A zip's directory names its one image.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Generator

from popsicle_py.images.files import ImageError
from popsicle_py.images.magic import XZ_MAGIC, ZSTD_MAGIC

__all__ = [
    "XZ_MAGIC",
    "ZSTD_MAGIC",
    "ZstdLayout",
    "lzma_size",
    "xz_measure",
    "xz_size",
    "zip_member",
    "zstd_measure",
    "zstd_walk",
]

#: zipfile's ZIP_STORED, ZIP_DEFLATED, ZIP_BZIP2 and ZIP_LZMA (zipfile is imported for zips only).
_ZIP_METHODS = {0: "stored", 8: "deflate", 12: "bzip2", 14: "lzma"}
_ZIP_METHOD_NAMES = {9: "Deflate64", 93: "zstd", 95: "xz", 98: "PPMd", 99: "AES encryption"}


def zip_member(path: str, shown: str) -> tuple[str, int]:
    """The single image inside a zip; several files would make the choice a guess."""
    import zipfile

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


def xz_size(fd: int, file_size: int) -> int | None:
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
            if header[:6] != XZ_MAGIC or header[6:8] != footer[8:10]:
                return None
            end = start
    except (ValueError, IndexError, struct.error):
        return None
    return total


# --------------------------------------------------------------------------- zstd layout


class ZstdLayout:
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
            if magic != ZSTD_MAGIC:
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


def zstd_walk(fd: int, file_size: int) -> int | None:
    """Uncompressed size of a zstd file if every frame states it; None otherwise.

    Reads a few bytes per 128 KiB block with pread, so it costs little even on large files.
    """
    size, problem = _zstd_layout(fd, file_size)
    return None if problem else size


def zstd_measure(fd: int, file_size: int, shown: str) -> int | None:
    """:func:`zstd_walk`, refusing a file whose frames announce more than it holds (cut off)."""
    size, problem = _zstd_layout(fd, file_size)
    if problem:
        raise ImageError(f"{shown} is a damaged or cut-off zstd file ({problem}): "
                         "download it again")
    return size


def _zstd_layout(fd: int, file_size: int) -> tuple[int | None, str | None]:
    """(the decoded size or None when a frame does not state it, what is wrong or None)."""
    layout = ZstdLayout()
    steps = layout.steps()
    pos = 0
    try:
        n, want = next(steps)
        while pos < file_size or (n == 0 and not want):
            data = None
            if want:
                data = os.pread(fd, n, pos)
                if len(data) < n:
                    return None, _cut(pos, n, file_size)
            pos += n
            if pos > file_size:
                return None, _cut(pos - n, n, file_size)
            n, want = steps.send(data)
    except StopIteration:
        return None, f"{layout.problem} at byte {pos}"
    if pos != file_size or not layout.at_boundary:
        return None, f"it ends inside a frame at byte {file_size}"
    return layout.size, None


def _cut(at: int, wanted: int, file_size: int) -> str:
    return (f"a frame at byte {at} announces {wanted} more bytes, the file ends at byte "
            f"{file_size}")


def xz_measure(fd: int, file_size: int, shown: str) -> int:
    """:func:`xz_size`, refusing a file without a whole index and footer at its end: a
    complete .xz always ends with them (and stream padding), so it was cut off or damaged."""
    size = xz_size(fd, file_size)
    if size is None:
        raise ImageError(f"{shown} does not end with a complete xz index and footer: it is cut "
                         "off (an interrupted download?) or damaged; download it again")
    return size


def lzma_size(head: bytes) -> int | None:
    """An LZMA-alone header's decoded size, None when it says "unknown" (streamed)."""
    size = int.from_bytes(head[5:13], "little")
    return None if size == 0xFFFF_FFFF_FFFF_FFFF else size
