"""The broadcast engine: read a source once, write it to many destinations in parallel.

One reader thread fills a bounded ring of page-aligned buckets; one thread per destination (a
*lane*) writes the very same buckets (memoryviews, never copies).  The reader waits while the
slowest lane still in the ring holds the oldest bucket, so memory stays at about
``(buckets + 1) x bucket size`` whatever the source size.  One supervisor per run delivers every
message to the caller's callback on the calling thread, polls ``cancel()`` and decides stalls.

Where each concern lives:

- :mod:`.config`: the frozen settings a run is made from, and the engine's constants;
- :mod:`.ring`: the bounded ring of buckets, and how a lane waits on it, moves on and leaves;
- :mod:`.reader`: fills the ring (head kept back, digests, block-map checks, laggards);
- :mod:`.supervisor`: threads, message delivery, cancellation and stalls;
- :mod:`.lane`: one destination's thread as everyone sees it (:class:`Lane`);
- :mod:`.writer`: :class:`BusWriter` (:mod:`.alone`: a laggard's own reads);
- :mod:`.finish`: each destination's finish (stamp, verification and repairs, head last), and
  the check against digests that :mod:`.verifier`'s :class:`BusVerifier` shares
  (:mod:`.checks` reads extents back);
- every byte moved to or from a destination goes through :mod:`popsicle_py.blockdev`.

Laggards: when a destination falls a full ring behind while another one waits for data, and the
source is a seekable file, that destination leaves the ring and goes on alone with positional
reads (``os.preadv``) into one small buffer of its own; the page cache serves those reads for
images that fit in memory, so the source is still read from disk once.  A stream (a
decompressor, a pipe) cannot be re-read, so its destinations stay in lock-step.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names below load on first use: a read needs only engine.watched
    from popsicle_py.blockdev import first_difference, read_full, sync, write_all
    from popsicle_py.engine.config import (
        CANCEL_GRACE,
        CHUNK,
        DEFAULT_BUCKET_SIZE,
        DEFAULT_BUCKETS,
        HEAD,
        LAGGARD_PATIENCE,
        POLL,
    )
    from popsicle_py.engine.results import DestinationResult, WriteResult
    from popsicle_py.engine.supervisor import (
        hear_signals_on_main_thread,
        keep_signals_for_main_thread,
    )
    from popsicle_py.engine.verifier import BusVerifier
    from popsicle_py.engine.writer import BusWriter
    from popsicle_py.errors import (
        AllDestinationsFailed,
        Cancelled,
        ChecksumMismatch,
        ExtentChecksumError,
        SourceChanged,
    )

_HOMES = {
    "popsicle_py.blockdev": ("first_difference", "read_full", "sync", "write_all"),
    "popsicle_py.engine.config": (
        "CANCEL_GRACE",
        "CHUNK",
        "DEFAULT_BUCKET_SIZE",
        "DEFAULT_BUCKETS",
        "HEAD",
        "LAGGARD_PATIENCE",
        "POLL",
    ),
    "popsicle_py.engine.results": ("DestinationResult", "WriteResult"),
    "popsicle_py.engine.supervisor": (
        "hear_signals_on_main_thread",
        "keep_signals_for_main_thread",
    ),
    "popsicle_py.engine.verifier": ("BusVerifier",),
    "popsicle_py.engine.writer": ("BusWriter",),
    "popsicle_py.errors": (
        "AllDestinationsFailed",
        "Cancelled",
        "ChecksumMismatch",
        "ExtentChecksumError",
        "SourceChanged",
    ),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> object:
    """Load a re-exported name from its home module the first time it is asked for."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value: object = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


__all__ = [
    "CANCEL_GRACE",
    "CHUNK",
    "DEFAULT_BUCKETS",
    "DEFAULT_BUCKET_SIZE",
    "HEAD",
    "LAGGARD_PATIENCE",
    "POLL",
    "AllDestinationsFailed",
    "BusVerifier",
    "BusWriter",
    "Cancelled",
    "ChecksumMismatch",
    "DestinationResult",
    "ExtentChecksumError",
    "SourceChanged",
    "WriteResult",
    "first_difference",
    "hear_signals_on_main_thread",
    "keep_signals_for_main_thread",
    "read_full",
    "sync",
    "write_all",
]
