"""A run's settings, frozen: the builders of BusWriter and BusVerifier only ever replace them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from popsicle_py.blockdev import FileLike
from popsicle_py.engine.head import HEAD as _HEAD
from popsicle_py.pacing import DEFAULT_RETRIES, MAX_CALL
from popsicle_py.records import record

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

DEFAULT_BUCKET_SIZE = 16 << 20
DEFAULT_BUCKETS = 4
#: No single read or write is larger than this (see pacing.Pacer for how calls are sized).
CHUNK = MAX_CALL
#: How often the calling thread wakes to poll ``cancel()`` when nothing else happens.
POLL = 0.1
#: How long a drive may hold back the others before it is sent on alone (see laggards).
LAGGARD_PATIENCE = 0.25
#: How long a cancelled run waits for workers to leave a system call before abandoning them.
CANCEL_GRACE = 1.5
#: How much longer it waits for a lane that writes the stamp back over a head it had begun.
UNDO_GRACE = 10.0
#: How long a second Ctrl-C (which quits at once) waits for lanes putting the stamp back over a
#: head they had begun: enough for a slow stick's MiB, and the shell is back soon all the same.
QUIT_GRACE = 3.0
#: The image's head: the bytes that make a drive look like the image to a computer (MBR, GPT
#: header and entries, ISO 9660 descriptors, UDF anchors, btrfs's superblock: see :mod:`.head`,
#: which sizes it per image, never more than this).  Written last, only once all else is good.
HEAD = _HEAD

#: (offset, length, expected hex checksum or None) of one block-map range.
Extent = tuple[int, int, str | None]
#: Reads ``length`` bytes of the source at ``offset`` again (for repairs), or None if it cannot.
SourceAt = Callable[[int, int], bytes]
#: Puts back what a :data:`Prepare` changed on a destination, except in its first ``n`` bytes
#: (what the head's stamp has overwritten since; 0: nothing).
PutBack = Callable[[int], None]
#: Run once before a destination is written: ``prepare(destination, answered)``, where
#: ``answered()`` says one of its small requests came back (the stall clock's credit for it);
#: raises OSError to fail that destination.  What it returns, if anything, is called once:
#: after the head's stamp, or as the lane ends before it.
Prepare = Callable[[FileLike, Callable[[], None]], PutBack | None]
#: Run on a destination before its head: ``step(destination, progressed, stopped)``, where
#: ``progressed(n)`` counts n bytes moved (a step that moves nothing for the stall timeout is a
#: stall, as writing is) and ``stopped()`` says the lane is stopped (end at once, leaving nothing
#: running: the head is not written); raises to fail that destination.
BeforeHead = Callable[[FileLike, Callable[[int], None], Callable[[], bool]], None]


class Selector(Protocol):
    """Which bytes of a stream to write, decided as it is read (a compressed image's trim:
    :class:`popsicle_py.usage.stream.StreamSelector`).  The reader still reads every byte.
    The image's head (:data:`HEAD`) is always kept: it is held whole and written last."""

    def decide(self, offset: int, limit: int) -> tuple[bool, int]:
        """(write them, length): the run of bytes from ``offset`` (at most ``limit``, more than
        0) with one decision, before they are read."""
        ...

    def saw(self, offset: int, data: memoryview) -> None:
        """The bytes just read at ``offset``, every one, in order."""
        ...


@record
class Config:
    """Everything a run needs to know besides its source, destinations and callbacks."""

    bucket_size: int = DEFAULT_BUCKET_SIZE
    buckets: int = DEFAULT_BUCKETS
    #: The caller's page-aligned buffer, used as the ring's first bucket.
    bucket: WriteableBuffer | None = None
    stall_timeout: float | None = None
    retries: int = DEFAULT_RETRIES
    expected_size: int | None = None
    extents: tuple[Extent, ...] | None = None
    extent_algo: str | None = None
    record: bool = False
    hold_head: bool = False
    laggards: bool = True
    skip_identical: bool = False
    #: Called by the reader once the source is read to its end (raises if it cannot vouch).
    vouch: Callable[[], None] | None = None
    #: The engine finishes each destination itself: [verify,] then the head, then Completed.
    pipeline: bool = False
    verify: bool = False
    repairs: int = 1
    source_at: SourceAt | None = None
    prepare: Prepare | None = None
    #: Run on each destination once it is written and verified, just before its head
    #: (--customize: the boot partition's files); raises to fail that destination.
    before_head: BeforeHead | None = None
    #: Spill a stream (a decompressor) to a file under this directory so that laggards can go
    #: on alone ("" for the default, $TMPDIR or /var/tmp; None: never spill).
    spill_dir: str | None = None
    #: After verification, before the head: the rest of the drive written, read back, cleared.
    surface: bool = False
    #: Writes only the runs it keeps of a stream read whole (drives in lock-step, no spill).
    select: Selector | None = None
