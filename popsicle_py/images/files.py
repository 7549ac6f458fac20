"""The one error of the image layer, and opening an image file with one-line refusals.

The bottom of the package: every other module of it raises :class:`ImageError` and opens files
through :func:`open_file`, so an image problem always reads the same, whoever finds it.
"""

from __future__ import annotations

import io
from typing import Any, Protocol

from popsicle_py.errors import Refused

__all__ = ["READ_SIZE", "ImageError", "Readable", "Tap", "open_file"]

READ_SIZE = 1 << 20  # compressed bytes per read: large enough to amortise the Python overhead


class ImageError(Refused):
    """A problem with the source image or its checksum, as one line the user can act on."""


class Readable(Protocol):
    """The file as stored, read front to back: a file, a download, a checksum tap's wrapper."""

    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class Tap(Protocol):
    """What hashes the file as it is read (checksums.ChecksumTap): wraps the opened file."""

    def wrap(self, raw: io.FileIO) -> io.RawIOBase: ...


def open_file(path: str, shown: str, tap: Tap | None = None) -> Any:
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
