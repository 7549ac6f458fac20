"""Hostile replugging under umockdev: a stick pulled mid-write and put back at once (the same
/dev name, no wait for its removal to be seen), or another stick given that name at once: each
result is its own stick's, and the pulled one is never ok.  (Mid-verify cannot be staged here:
a testbed's drive is a plain file, verified faster than a pull is seen.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from faulty import FaultyFile, faulty_files
from test_watch import WATCHING, MiB, Stick, needs_testbed, watch


@needs_testbed
@pytest.mark.umockdev
@pytest.mark.parametrize("other", [False, True])
def test_a_stick_pulled_and_put_back_at_once_is_a_new_drive_and_the_pulled_one_failed(
        tmp_path: Path, other: bool) -> None:
    data = os.urandom(6 * MiB + 512)
    first = Stick("c", 3, 128 * MiB)
    second = Stick("c", 4 if other else 3, 128 * MiB)
    with faulty_files() as made:
        image = FaultyFile(len(data), content=data, faults={"crawl": (0, 4 * MiB)})
        made.append(image)
        run = watch(tmp_path, [str(image.file), "--yes", "--force", "--count", "2",
                               "--no-power-off"],
                    [WATCHING, {"add": first.description},
                     {"wait": {"event": "progress", "device": first.dev, "phase": "writing"}},
                     {"remove": first.unplug}, {"add": second.description},
                     {"wait": {"event": "result", "device": first.dev}},
                     {"wait": {"event": "result", "device": first.dev}}],
                    read=(first.dev,), timeout=60)
    results = run.summary["results"]
    assert [(r["drive"]["seq"], r["drive"]["port_path"]) for r in results] == [
        (1, first.usb.rsplit("/", 1)[1]), (2, second.usb.rsplit("/", 1)[1])], results
    assert results[0]["status"] == "failed" and results[0]["cause"] == "removed", results[0]
    assert results[1]["status"] == "ok", results[1]
    assert (run.files[first.dev] or b"")[: len(data)] == data
    assert run.rc == 1, run.stderr

