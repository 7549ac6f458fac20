"""Messages the engine delivers to the caller's callback.

Small frozen dataclasses, so a callback can `match` on them and keep them without copying.
A message's ``id`` is the destination's index in the list given to the engine.
"""

from __future__ import annotations

from dataclasses import dataclass


class BusWriterMessage:
    """Namespace for the writer's messages (``BusWriterMessage.Written`` and so on)."""

    @dataclass(frozen=True)
    class Written:
        """Cumulative bytes written to destination ``id`` so far."""

        id: int
        bytes_written: int

    @dataclass(frozen=True)
    class Skipped:
        """Cumulative bytes destination ``id`` already held (with ``skip_identical``)."""

        id: int
        bytes_skipped: int

    @dataclass(frozen=True)
    class Completed:
        """Every byte reached destination ``id`` and it was flushed and fsynced."""

        id: int

    @dataclass(frozen=True)
    class Errored:
        """Destination ``id`` failed and left the ring; the others go on."""

        id: int
        why: OSError


class BusVerifierMessage:
    """Namespace for the verifier's messages."""

    @dataclass(frozen=True)
    class Read:
        """Cumulative bytes of destination ``id`` read back and compared so far."""

        id: int
        bytes_read: int

    @dataclass(frozen=True)
    class Valid:
        """Destination ``id`` holds exactly the source."""

        id: int

    @dataclass(frozen=True)
    class Invalid:
        """Destination ``id`` differs from the source.

        ``offset`` is the first differing byte (or where the destination ended early).  When
        only per-bucket digests were available, ``offset`` is the start of the first bad bucket
        and ``end`` its end, so the bad byte lies in ``[offset, end)``; otherwise ``end`` is None.
        """

        id: int
        offset: int
        end: int | None = None

    @dataclass(frozen=True)
    class Errored:
        """Reading destination ``id`` back failed."""

        id: int
        why: OSError
