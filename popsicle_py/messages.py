"""Messages the engine delivers to the caller's callback, always on the calling thread.

Small frozen dataclasses, so a callback can `match` on them and keep them without copying.
A message's ``id`` is the destination's index in the list given to the engine.
"""

from __future__ import annotations

import time
from dataclasses import field

from popsicle_py.events import Step
from popsicle_py.records import record


class BusWriterMessage:
    """Namespace for the writer's messages (``BusWriterMessage.Written`` and so on)."""

    @record
    class Written:
        """Cumulative bytes of the image written to destination ``id`` so far."""

        id: int
        bytes_written: int
        #: When it was posted (on the destination's thread): the speed rule's clock, not the
        #: moment the job got round to it (a certificate being signed holds the job's thread).
        at: float = field(default_factory=time.monotonic, compare=False, repr=False)

    @record
    class Skipped:
        """Cumulative bytes destination ``id`` already held (with ``skip_identical``)."""

        id: int
        bytes_skipped: int
        #: When it was posted (on the destination's thread): the speed rule's clock, not the
        #: moment the job got round to it (a certificate being signed holds the job's thread).
        at: float = field(default_factory=time.monotonic, compare=False, repr=False)

    @record
    class Stage:
        """Destination ``id`` began a step of its own (probing, verifying, its head)."""

        id: int
        step: Step

    @record
    class Verified:
        """Cumulative bytes of destination ``id`` read back and checked (with ``verify_each``)."""

        id: int
        bytes_read: int
        #: When it was posted (on the destination's thread): the speed rule's clock, not the
        #: moment the job got round to it (a certificate being signed holds the job's thread).
        at: float = field(default_factory=time.monotonic, compare=False, repr=False)

    @record
    class Repaired:
        """Destination ``id`` had ``buckets`` bad buckets rewritten, and now reads back right."""

        id: int
        buckets: int

    @record
    class Invalid:
        """Destination ``id`` does not read back as the image (with ``verify_each``).

        ``offset`` is the first bad byte when it could be found, else the start of the bad
        range ``[offset, end)``; ``end`` is None when ``offset`` is exact.  ``ended`` says the
        destination ended at ``offset``, before the image did.
        """

        id: int
        offset: int
        end: int | None = None
        ended: bool = False

    @record
    class Completed:
        """Every byte reached destination ``id`` and it was fsynced (and, with ``verify_each``,
        it read back as the image, its head written last)."""

        id: int
        #: SHA-256 (hex) of the image's range as read back in the verify pass; None when not
        #: read back whole (no verification, a block map's holes).
        sha256: str | None = None
        #: Seconds the destination spent writing (its head included) and verifying, timed on
        #: its own thread; None where it did not (verifying, without ``verify_each``).  Not
        #: compared: two runs that did the same are equal, however long they took.
        write_seconds: float | None = field(default=None, compare=False)
        verify_seconds: float | None = field(default=None, compare=False)

    @record
    class Errored:
        """Destination ``id`` failed and left the ring; the others go on."""

        id: int
        why: OSError

    @record
    class HeadUndone:
        """Destination ``id`` failed or was stopped once its head was being written: the
        stamp was written back over its first ``length`` bytes (``done``), or could not be
        (it may then hold the image's head).  Comes before the drive's ``Invalid`` or
        ``Errored``."""

        id: int
        length: int
        done: bool

    @record
    class LockStep:
        """A stream's destinations go at the slowest one's pace from here on, and why
        (no room for the spill file that would let laggards go on alone)."""

        reason: str


class BusVerifierMessage:
    """Namespace for the verifier's messages."""

    @record
    class Read:
        """Cumulative bytes of destination ``id`` read back and compared so far."""

        id: int
        bytes_read: int

    @record
    class Valid:
        """Destination ``id`` holds exactly the source (whose SHA-256 the reader computed
        as it read it, when it did)."""

        id: int
        sha256: str | None = None
        #: Seconds it took to read it back, timed on its own thread (not compared).
        seconds: float | None = field(default=None, compare=False)

    @record
    class Invalid:
        """Destination ``id`` differs from the source.

        ``offset`` is the first differing byte (or where the destination ended early).  When
        only per-bucket digests were available, ``offset`` is the start of the first bad bucket
        and ``end`` its end, so the bad byte lies in ``[offset, end)``; otherwise ``end`` is None.
        """

        id: int
        offset: int
        end: int | None = None

    @record
    class Errored:
        """Reading destination ``id`` back failed."""

        id: int
        why: OSError


#: Every message a writer's callback may get (besides what the caller posts itself).
WriterMessage = (BusWriterMessage.Written | BusWriterMessage.Skipped | BusWriterMessage.Stage
                 | BusWriterMessage.Verified | BusWriterMessage.Repaired
                 | BusWriterMessage.Invalid | BusWriterMessage.Completed
                 | BusWriterMessage.Errored | BusWriterMessage.LockStep
                 | BusWriterMessage.HeadUndone)
#: Every message a verifier's callback may get.
VerifierMessage = (BusVerifierMessage.Read | BusVerifierMessage.Valid
                   | BusVerifierMessage.Invalid | BusVerifierMessage.Errored)
