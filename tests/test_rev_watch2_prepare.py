"""A stick plugged in while the image is still being prepared (its SHA-256 checked, here)
was plugged in after the operator said yes to "every drive plugged in from now on": it is
written once watching begins, not left alone as one plugged in before the start.  The stick
that was there before the session began is still left alone."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from faulty import FaultyFile, faulty_files
from test_watch import WATCHING, B, C, MiB, needs_testbed, result_of, watch


@needs_testbed
@pytest.mark.umockdev
def test_a_stick_plugged_in_during_the_checksum_is_written(tmp_path: Path) -> None:
    data = os.urandom(4 * MiB)
    with faulty_files() as made:
        image = FaultyFile(len(data), content=data, faults={"crawl": (0, 2 * MiB)})
        made.append(image)
        run = watch(tmp_path, [str(image.file), "--yes", "--force", "--count", "1",
                               "--no-power-off", "--sha256", hashlib.sha256(data).hexdigest()],
                    [{"wait": {"event": "phase", "phase": "checksum"}}, {"add": C.description},
                     WATCHING, result_of(C)],
                    present=(B.description,), read=(B.dev, C.dev))
    assert run.rc == 0, run.stderr
    kinds = [(e["event"], e.get("device")) for e in run.events]
    assert kinds.index(("phase", None)) < kinds.index(("drive_added", C.dev))
    assert [(r["device"], r["status"]) for r in run.summary["results"]] == [(C.dev, "ok")]
    assert (run.files[C.dev] or b"")[: len(data)] == data
    assert run.files[B.dev] == b""
    assert not run.of("drive_added", device=B.dev)
    assert any(B.dev in e["text"] and C.dev not in e["text"] for e in run.of("note")
               if e["text"].startswith("left alone"))


@needs_testbed
@pytest.mark.umockdev
def test_a_stick_plugged_in_while_the_image_is_downloaded_is_written(tmp_path: Path) -> None:
    """The download stalls once halfway (the client waits out its read timeout and resumes):
    the stick plugged in meanwhile is written from the downloaded copy."""
    from webserver import Served, serving

    data = os.urandom(2 * MiB)
    fast = {"POPSICLE_PY_HTTP_TIMEOUT": "1", "POPSICLE_PY_HTTP_RETRIES": "2",
            "POPSICLE_PY_HTTP_BACKOFF": "0.01", "POPSICLE_PY_HTTP_OUTAGE": "0"}
    with serving() as web:
        web.add("/disk.img", Served(data, stall_at=[len(data) // 2]))
        run = watch(tmp_path, [web.url("/disk.img"), "--yes", "--force", "--count", "1",
                               "--no-power-off"],
                    [{"wait": {"event": "phase", "phase": "downloading"}},
                     {"add": C.description}, WATCHING, result_of(C)],
                    present=(B.description,), read=(B.dev, C.dev),
                    env={"TMPDIR": str(tmp_path), **fast})
    assert run.rc == 0, run.stderr
    assert [(r["device"], r["status"]) for r in run.summary["results"]] == [(C.dev, "ok")]
    assert (run.files[C.dev] or b"")[: len(data)] == data
    assert run.files[B.dev] == b""
