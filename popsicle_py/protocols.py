"""The small protocols the layers meet at: a view that shows events, a source of bytes,
what of an image the drives get.

Like rich's ``__rich_console__``, each is what a caller needs and nothing more, so a GUI, a
web page or a test can bring its own.  Nothing here imports an implementation.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from popsicle_py.events import WatchEvent

if TYPE_CHECKING:
    from popsicle_py.bmap import Bmap
    from popsicle_py.images import ChecksumTap
    from popsicle_py.images.formats import Format


@runtime_checkable
class View(Protocol):
    """Shows a run's events; every call comes from the one thread that runs the job."""

    def handle(self, event: WatchEvent) -> None:
        """Show one event (the last one of a run is always a ``Summary``)."""

    def close(self) -> None:
        """The run is over: stop any live display and flush."""

    def announce(self, text: str) -> None:
        """Say ``text`` (a signal was received) from a signal handler: store it, no I/O."""


class Source(Protocol):
    """An image as the jobs read it: a file, a download, a block device or standard input."""

    @property
    def path(self) -> str:
        """What the user named (a path, a URL, ``-``)."""

    @property
    def format(self) -> str:
        """The format's name as events show it (``raw``, ``xz``, ...)."""

    @property
    def kind(self) -> Format:
        """The format's record: what the jobs ask of it (decoded? read whole first?)."""

    @property
    def size(self) -> int | None:
        """The image's size in bytes once decoded; None when unknown before the end."""

    @property
    def compressed(self) -> bool:
        """Whether what is read from the file is decoded first."""

    @property
    def seekable_raw(self) -> bool:
        """Whether a drive may read any range of the image by position (a raw file)."""

    @property
    def tappable(self) -> bool:
        """Whether the write pass reads the whole file in order (its checksum can be taken)."""

    def open(self, tap: ChecksumTap | None = None) -> io.RawIOBase:
        """The decoded image from its first byte (``tap`` sees the file's bytes)."""

    def read_at(self, offset: int, length: int) -> bytes:
        """Decoded bytes at ``offset`` (repairs and mismatch offsets)."""


class TrimPlan(Protocol):
    """Which ranges of a raw image the drives get (``app.trim.Trim`` is one)."""

    @property
    def block_map(self) -> Bmap | None:
        """The ranges to write, as a block map without checksums (None: every byte)."""

    @property
    def unused(self) -> int:
        """Bytes of the image not written: its file systems' free space."""

    @property
    def notes(self) -> tuple[str, ...]:
        """What is said before the drives are written."""
