"""Hostile uevents under umockdev: the same stick announced again without being pulled
(``udevadm trigger --action=add``, udevd restarted) is the stick already written, not a new
drive: it is neither written again nor counted twice."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_watch import (
    READER,
    WATCHING,
    C,
    D,
    MiB,
    fixture,
    image_file,
    needs_testbed,
    result_of,
    watch,
)


@needs_testbed
@pytest.mark.umockdev
def test_another_add_for_a_stick_already_written_is_not_a_second_drive(tmp_path: Path) -> None:
    image, data = image_file(tmp_path, 2 * MiB)
    run = watch(tmp_path, [str(image), "--yes", "--count", "2", "--no-power-off"],
                [WATCHING, {"add": C.description}, result_of(C),
                 {"uevent": C.disk, "action": "add"}, {"add": D.description}, result_of(D)],
                read=(C.dev, D.dev))
    assert run.rc == 0, run.stderr
    results = run.summary["results"]
    assert [(r["device"], r["drive"]["seq"], r["status"]) for r in results] == [
        (C.dev, 1, "ok"), (D.dev, 2, "ok")], results
    assert len(run.of("drive_added", device=C.dev)) == 1
    assert len(run.of("phase", device=C.dev, phase="writing")) == 1
    assert (run.files[D.dev] or b"")[: len(data)] == data


@needs_testbed
@pytest.mark.umockdev
def test_two_cards_of_one_size_in_turn_in_a_reader_are_two_drives(tmp_path: Path) -> None:
    """Card A written, taken out (the reader empty: a "change" to size 0), card B of the same
    size put in: the reader's serial is not the card's, and without a diskseq (kernels before
    5.15, here) the two look alike, yet B was put in after A went out: it is written."""
    image, _ = image_file(tmp_path, 1 * MiB)
    card = {"change": READER, "attributes": {"size": str(64 * MiB // 512)}}
    run = watch(tmp_path, [str(image), "--yes", "--count", "2", "--no-power-off"],
                [WATCHING, card, {"wait": {"event": "result", "device": "/dev/sdf"}},
                 {"change": READER, "attributes": {"size": "0"}}, card,
                 {"wait": {"event": "result", "device": "/dev/sdf"}}],
                present=(fixture("usb-reader-empty.umockdev"),), read=("/dev/sdf",))
    assert run.rc == 0, run.stderr
    results = run.summary["results"]
    assert [(r["device"], r["drive"]["seq"], r["status"]) for r in results] == [
        ("/dev/sdf", 1, "ok"), ("/dev/sdf", 2, "ok")], results
