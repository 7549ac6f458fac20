"""What a run hands back: per-destination results and what verification without the source needs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import field

from popsicle_py.records import record


@record
class DestinationResult:
    """How one destination did: bytes written and the error that ended it, if any."""

    id: int
    bytes_written: int
    error: OSError | None = None
    bytes_skipped: int = 0
    #: Buckets rewritten because verification found them bad (with ``verify_each``).
    repaired: int = 0
    #: First bad byte (or the start of the bad bucket) when verification failed.
    mismatch: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@record
class WriteResult(Sequence[DestinationResult]):
    """Per-destination results, plus what verification without the source needs.

    ``digests`` holds an XXH3-128 digest per extent of the source (when recording was asked
    for), ``extents`` each digest's (offset, length); ``held`` is the image's head (its first
    MiB, or up to its first partition: :mod:`.head`) kept back by
    :meth:`BusWriter.first_bucket_last`, and is the first extent.
    """

    results: tuple[DestinationResult, ...]
    size: int
    bucket_size: int
    digests: tuple[bytes, ...] = ()
    held: memoryview | None = field(default=None, repr=False)
    extents: tuple[tuple[int, int], ...] = ()

    def __getitem__(self, index: int) -> DestinationResult:  # type: ignore[override]
        return self.results[index]

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[DestinationResult]:
        return iter(self.results)
