"""The meeting point of the session's thread and the server's loop.

The session's thread calls :meth:`Hub.post` for every event: it takes a lock for a list
append and, when the list was empty, one ``call_soon_threadsafe``; it never waits on the
loop, a client or the network, so no writer is ever held up by the page.  Progress events of
a drive not yet delivered are merged (the newest wins), so the list stays as short as the
number of drives plus the few events that change a state; no result, phase or plug event is
ever dropped.  On the loop, :meth:`_flush` feeds the board and wakes the clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque

from popsicle_py import events
from popsicle_py.events import JsonObject
from popsicle_py.identity import MediaIdentity
from popsicle_py.station.board import Board

#: A client of /api/events that falls this far behind loses its progress events first, and
#: is disconnected (it reconnects) rather than dropping anything else.
CLIENT_BACKLOG = 2000


class EventClient:
    """One reader of ``/api/events``: NDJSON lines waiting to be sent."""

    def __init__(self) -> None:
        self.lines: deque[tuple[bool, bytes]] = deque()  # (is progress, line)
        self.wake = asyncio.Event()
        self.overflowed = False

    def push(self, line: bytes, progress: bool) -> None:
        if len(self.lines) >= CLIENT_BACKLOG:
            if progress:
                return
            kept = deque(item for item in self.lines if not item[0])
            if len(kept) >= CLIENT_BACKLOG:
                self.overflowed = True
            self.lines = kept
        self.lines.append((progress, line))
        self.wake.set()


def event_json(event: events.WatchEvent, slot: str | None) -> JsonObject:
    data = event.to_json()
    data["slot"] = slot
    return data


class Hub:
    def __init__(self, board: Board) -> None:
        self.board = board
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._pending: list[tuple[events.WatchEvent, str | None, float,
                                  MediaIdentity | None]] = []
        #: (device, seq) -> the index of its progress waiting in ``_pending``: two drives of
        #: one name (one pulled, still ending) are never merged into one.
        self._progress_at: dict[tuple[str | None, int | None], int] = {}
        #: Set (then replaced) each time the board changes: pages wait on the current one.
        self.changed: asyncio.Event | None = None
        self.clients: set[EventClient] = set()
        self.closing = False
        #: The media of the drives the station admitted, by seq, until their drive_added
        #: is posted (their tile keeps it: identify checks it).  The session's thread only.
        self.admitted: dict[int, MediaIdentity] = {}

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop's thread, before the first event."""
        self.loop = loop
        self.changed = asyncio.Event()

    # ------------------------------------------------------------------------------------
    # The session's thread

    def post(self, event: events.WatchEvent, slot: str | None,
             identity: MediaIdentity | None = None) -> None:
        """Hand an event to the loop; never blocks (a lock held for a list append).
        ``identity``: a ``drive_added``'s medium, for its tile."""
        now = time.monotonic()
        device = getattr(event, "device", None)
        key = (device, getattr(event, "seq", None))
        with self._lock:
            first = not self._pending
            if isinstance(event, events.Progress) and key in self._progress_at:
                self._pending[self._progress_at[key]] = (event, slot, now, None)
            else:
                if isinstance(event, events.Progress) and device is not None:
                    self._progress_at[key] = len(self._pending)
                elif device is not None:  # a phase, a result...: what follows is newer
                    for waiting in [k for k in self._progress_at if k[0] == device]:
                        del self._progress_at[waiting]
                self._pending.append((event, slot, now, identity))
        loop = self.loop
        if first and loop is not None:
            # A closed loop: the server is gone, and the drives go on.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._flush)

    # ------------------------------------------------------------------------------------
    # The loop's thread

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._progress_at.clear()
        for event, slot, at, identity in pending:
            self.board.apply(event, slot, at, identity)
            line = json.dumps(event_json(event, slot)).encode() + b"\n"
            progress = isinstance(event, events.Progress)
            for client in self.clients:
                client.push(line, progress)
        self.notify()

    def notify(self) -> None:
        """Wake every page: the board changed."""
        if self.changed is not None:
            self.changed.set()
            self.changed = asyncio.Event()

    def snapshot(self) -> JsonObject:
        return self.board.snapshot(time.monotonic())
