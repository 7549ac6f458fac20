"""What BusWriter and BusVerifier share: the caller's arguments, a frozen configuration that
the (chainable) builder methods replace, and ``post()`` for messages of the caller's own."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, TypeVar

from popsicle_py.blockdev import FileLike
from popsicle_py.engine.config import Config
from popsicle_py.engine.supervisor import Callback, CancelCheck

B = TypeVar("B", bound="Builder")


class Builder:
    """A run's arguments and settings; each builder method returns the builder itself."""

    def __init__(self, source: FileLike | None, destinations: Sequence[FileLike],
                 callback: Callback, cancel: CancelCheck) -> None:
        if not destinations:
            raise ValueError("no destinations: give at least one")
        self.source = source
        self.destinations = list(destinations)
        self.callback = callback
        self.cancel = cancel
        self.config = Config()
        self._lock = threading.Lock()
        self._early: list[object] = []
        self._outbox: queue.SimpleQueue[object] | None = None

    def _set(self: B, **changes: Any) -> B:
        self.config = replace(self.config, **changes)
        return self

    def buckets(self: B, count: int) -> B:
        """How many buckets may be in flight (at least 1)."""
        if count < 1:
            raise ValueError("buckets must be at least 1")
        return self._set(buckets=count)

    def bucket_size(self: B, size: int) -> B:
        """Bucket size in bytes, when no buffer of the caller's is given."""
        if size < 1:
            raise ValueError("bucket size must be at least 1 byte")
        return self._set(bucket_size=size, bucket=None)

    def from_source(self: B, source: FileLike) -> B:
        """The source to read, for a caller that builds the engine before it opens the source
        (what it posts meanwhile, a download's progress, waits for the run)."""
        self.source = source
        return self

    def stall_timeout(self: B, seconds: float | None) -> B:
        """Fail a destination that makes no progress for this long (None: never)."""
        return self._set(stall_timeout=seconds)

    def post(self, message: object) -> None:
        """From any thread: deliver ``message`` to the callback, on the calling thread.

        For news of the caller's own that arises on another thread (a download's progress, read
        by the reader): the callback stays single-threaded.  Before the run starts, messages
        wait for it.
        """
        with self._lock:
            outbox = self._outbox
            if outbox is None:
                self._early.append(message)
                return
        outbox.put(message)

    def _attach(self, outbox: queue.SimpleQueue[object]) -> None:
        """A run begins: what was posted before it goes first."""
        with self._lock:
            for message in self._early:
                outbox.put(message)
            self._early.clear()
            self._outbox = outbox
