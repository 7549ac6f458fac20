"""The bounded ring of buckets: one producer (the reader), many consumers (the lanes).

All waits happen on one condition.  A published bucket is a view of one slot's buffer; a slot is
free again once every lane still in the ring has moved past the bucket it holds.  How a lane
waits for a bucket, moves past it, waits for the reader and leaves the ring lives here, for the
writer's lanes and the verifier's alike.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from popsicle_py.buffers import aligned_buffer
from popsicle_py.engine.config import POLL
from popsicle_py.engine.lane import Lane


class Ring:
    """Buckets in flight, where each lane is, and who is waiting for data."""

    def __init__(self, count: int, bucket_size: int, first: memoryview | None = None) -> None:
        self.bucket_size = bucket_size
        self.buffers = [first if (i == 0 and first is not None)
                        else memoryview(aligned_buffer(bucket_size)) for i in range(count)]
        self.starts = [0] * count  # where the published bytes begin in the slot's buffer
        self.lengths = [0] * count
        self.offsets = [0] * count  # where they belong in the source
        self.cond = threading.Condition()
        self.head = 0  # buckets published so far
        self.eof = False
        self.total: int | None = None  # the source's size, once the reader reached its end
        self.vouched = False  # the reader's end-of-source check passed
        self.positions: dict[int, int] = {}  # lane id -> next bucket it needs
        self.starving: set[int] = set()  # lanes waiting for a bucket not yet published

    def __len__(self) -> int:
        return len(self.buffers)

    def slot_free(self, seq: int) -> bool:
        oldest = seq - len(self.buffers)
        return all(pos > oldest for pos in self.positions.values())

    def buffer_for(self, seq: int) -> memoryview:
        return self.buffers[seq % len(self.buffers)]

    def publish(self, seq: int, start: int, length: int, offset: int) -> None:
        """Make bucket ``seq`` (``buffer[start:start+length]``) available; caller holds the lock."""
        slot = seq % len(self.buffers)
        self.starts[slot], self.lengths[slot], self.offsets[slot] = start, length, offset
        self.head = seq + 1
        self.cond.notify_all()

    def bucket(self, seq: int) -> tuple[memoryview, int]:
        """Bucket ``seq``'s bytes and where they belong; caller holds the lock."""
        slot = seq % len(self.buffers)
        start = self.starts[slot]
        return self.buffers[slot][start : start + self.lengths[slot]], self.offsets[slot]

    def replace_slot(self, seq: int) -> None:
        """Give bucket ``seq``'s slot fresh memory holding the same bytes.

        The old buffer stays with whoever still writes from it (a detached laggard).
        """
        slot = seq % len(self.buffers)
        start, end = self.starts[slot], self.starts[slot] + self.lengths[slot]
        fresh = memoryview(aligned_buffer(self.bucket_size))
        fresh[start:end] = self.buffers[slot][start:end]
        self.buffers[slot] = fresh

    def join(self, lane_ids: Iterable[int]) -> None:
        """These lanes start at the first bucket: the reader waits for them."""
        with self.cond:
            for lane_id in lane_ids:
                self.positions[lane_id] = 0

    def wake(self) -> None:
        """Wake every thread waiting on the ring (the run is stopping)."""
        with self.cond:
            self.cond.notify_all()

    def leave(self, lane_id: int) -> None:
        """A lane no longer holds the ring back (done, failed, or given up)."""
        with self.cond:
            self.positions.pop(lane_id, None)
            self.starving.discard(lane_id)
            self.cond.notify_all()

    def next_bucket(self, lane: Lane, seq: int, leaving: Callable[[], bool], *,
                    nudge: bool = False) -> tuple[memoryview, int] | None:
        """Wait for bucket ``seq`` (waiting for data is never a stall): its bytes and offset.

        None when ``leaving()`` (checked under the lock, so a lane sent on alone never reads a
        slot the reader has refilled) or when the source ended before it.  ``nudge`` wakes the
        reader as the lane begins to wait: it may let a laggard go now.
        """
        with self.cond:
            lane.waiting = True
            self.starving.add(lane.id)
            if nudge and seq >= self.head and not self.eof:
                self.cond.notify_all()
            began = time.monotonic()
            while not leaving() and seq >= self.head and not self.eof:
                self.cond.wait(POLL)
            lane.starved += time.monotonic() - began
            self.starving.discard(lane.id)
            lane.waiting = False
            lane.touch()
            if leaving() or seq >= self.head:
                return None
            return self.bucket(seq)

    def moved_past(self, lane_id: int, seq: int) -> None:
        """The lane is done with bucket ``seq``: its slot may be free for the reader.

        The waiters are woken only when this frees the slot the reader needs next (bucket
        ``head``'s): a lane that was not the last one holding it changes nothing for anyone,
        and waking every waiting lane at every move of each of 32 lanes is a herd of wake-ups.
        """
        with self.cond:
            old = self.positions.get(lane_id)
            if old is None:
                return
            self.positions[lane_id] = seq + 1
            if old <= self.head - len(self.buffers) and self.slot_free(self.head):
                self.cond.notify_all()

    def wait_until(self, lane: Lane, ready: Callable[[], bool]) -> bool:
        """Wait (not a stall: the reader is behind) until ``ready()``; False if stopped."""
        with self.cond:
            lane.waiting = True
            while not ready() and not lane.stopped:
                self.cond.wait(POLL)
            lane.waiting = False
            lane.touch()
        return not lane.stopped

    def release(self) -> None:
        """Drop the buckets' memory at the end of a run (a lane still writing keeps its own)."""
        with self.cond:
            self.buffers = []
