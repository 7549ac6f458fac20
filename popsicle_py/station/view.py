"""The station as a :class:`~popsicle_py.protocols.View`: every event tagged with its slot,
then the journal, the page and the terminal, in that order.

The journal comes first so that a result a person sees (on the page or the terminal) is
already on disk; the page's hub only queues (it never waits on the network).
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import IO, Protocol

from popsicle_py import events
from popsicle_py.drives import media_identity
from popsicle_py.identity import MediaIdentity
from popsicle_py.signals import say_on_stderr
from popsicle_py.station.hook import Hook
from popsicle_py.station.hub import Hub, event_json
from popsicle_py.station.recorder import Recorder, Tagger
from popsicle_py.view import PLAIN_INTERVAL, Out, PlainView

#: The terminal's JSON lines get a drive's progress this often at most (the page: at once).
JSON_INTERVAL = 1.0


class Terminal(Protocol):
    def handle(self, event: events.WatchEvent, slot: str | None) -> None: ...

    def close(self) -> None: ...

    def announce(self, text: str) -> None: ...


class SlotJsonView:
    """watch's JSON lines, each with its ``slot`` (null: the image, or an unmapped port)."""

    def __init__(self, out: IO[str] | None = None, interval: float = JSON_INTERVAL) -> None:
        self.out = Out(out)
        self.interval = interval
        self._last: dict[tuple[str | None, int | None, str], float] = {}

    def handle(self, event: events.WatchEvent, slot: str | None) -> None:
        if isinstance(event, events.Progress):
            key, now = (event.device, event.seq, event.phase), time.monotonic()
            complete = event.total is not None and event.done >= event.total
            if not complete and now - self._last.get(key, 0.0) < self.interval:
                return
            self._last[key] = now
        self.out.write(json.dumps(event_json(event, slot)) + "\n",
                       droppable=isinstance(event, events.Progress))

    def close(self) -> None:
        self.out.close()

    def announce(self, text: str) -> None:
        """A signal's news, on stderr; and a reader that takes nothing no longer holds the
        end (:meth:`Out.close` gives it up after ``GIVE_UP`` seconds, as watch's does)."""
        self.out.interrupted()
        say_on_stderr(text)


class SlotPlainView:
    """watch's plain lines, each after ``[slot LABEL]`` when it is about a slot's drive."""

    def __init__(self, out: IO[str] | None = None, interval: float = PLAIN_INTERVAL) -> None:
        self._plain = PlainView(out, interval)

    def handle(self, event: events.WatchEvent, slot: str | None) -> None:
        self._plain.out.prefix = f"[slot {slot}] " if slot is not None else ""
        self._plain.handle(event)

    def close(self) -> None:
        self._plain.out.prefix = ""
        self._plain.close()

    def announce(self, text: str) -> None:
        """As SlotJsonView's: on stderr, and a stuck reader no longer holds the end."""
        self._plain.announce(text)


class StationView:
    """What the session emits to: tags each event with its slot and hands it on."""

    def __init__(self, tagger: Tagger, recorder: Recorder, hub: Hub,
                 terminal: Terminal, hook: Hook | None = None) -> None:
        self.tagger, self.recorder, self.hub, self.terminal = tagger, recorder, hub, terminal
        self.hook = hook
        self.journal_failed = False

    def handle(self, event: events.WatchEvent) -> None:
        slot = self.tagger.slot(event)
        if not self.journal_failed:
            try:
                self.recorder.handle(event, slot)
            except sqlite3.Error as exc:  # a full disk: said once, and the drives go on
                self.journal_failed = True
                note = events.Note(f"journal {self.recorder.journal.path}: cannot write: "
                                   f"{exc}; the drives go on without it")
                self.hub.post(note, None)
                self.terminal.handle(note, None)
        self.hub.post(event, slot, self._identity(event, slot))
        self.terminal.handle(event, slot)
        if self.hook is not None:
            self.hook.handle(event, slot)

    def _identity(self, event: events.WatchEvent, slot: str | None) -> MediaIdentity | None:
        """A drive's medium as it came, for its tile: an admitted drive's as the session
        recorded it, another one's (refused: the tile says why) read now."""
        if not isinstance(event, events.DriveAdded) or slot is None:
            return None
        seq = event.info.seq if event.info is not None else None
        if seq is not None and seq in self.hub.admitted:
            return self.hub.admitted.pop(seq)
        try:
            return media_identity(event.device)
        except OSError:  # gone already
            return None

    def close(self) -> None:
        self.terminal.close()

    def announce(self, text: str) -> None:
        say_on_stderr(text)
