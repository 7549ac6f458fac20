"""A station's terminal read by a program that stops reading (``station --json | consumer``
left paused for hours): what waits for it stays bounded, as watch's and flash's does.

Progress, which the next progress says again, is dropped while lines wait; every other
line waits, in order.  Before, the station's views (JSON and plain, with their slots) kept
every progress line in memory until the reader came back.
"""

from __future__ import annotations

import fcntl
import io
import os
import threading

import pytest

from popsicle_py import events
from popsicle_py.station.view import SlotJsonView, SlotPlainView, Terminal

F_SETPIPE_SZ = 1031


@pytest.mark.parametrize("kind", ["json", "plain"])
def test_a_paused_reader_gets_every_line_but_not_every_progress(kind: str) -> None:
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    out = io.TextIOWrapper(os.fdopen(w, "wb"), write_through=True)
    # A progress line at each event (no interval), so that the reader is soon behind.
    view: Terminal = SlotJsonView(out, interval=0) if kind == "json" else SlotPlainView(
        out, interval=0)
    total = 1 << 40
    for i in range(2000):  # far more than the pipe holds, and the reader takes nothing
        view.handle(events.Progress("/dev/sdc", events.Step.WRITING, i << 19, total), "A3")
        if i % 500 == 0:
            view.handle(events.Note(f"note {i}"), "A3")
    view.handle(events.Note("last"), None)

    def close() -> None:  # the end: what waits is written at the reader's pace
        view.close()
        out.close()

    closing = threading.Thread(target=close)
    closing.start()  # the reader comes back and reads to the end
    with os.fdopen(r, "rb") as reader:
        text = reader.read().decode()
    closing.join()
    lines = text.splitlines()
    assert sum("note " in line for line in lines) == 4 and "last" in lines[-1]
    progress = sum("writing" in line for line in lines)
    assert 0 < progress < 200, progress  # most of the 2000 were dropped while lines waited
