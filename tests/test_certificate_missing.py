"""A certificate asked for that could not be written: the drive stays ok (its bytes are
right), the run does not.  Before, a run whose certificate directory filled up mid-run (or
whose signer went away) ended "done: 2 of 2 drives ok", exit 0, with a note only: a script
that hands out certified sticks shipped one without its proof."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from popsicle_py import events, verdicts
from popsicle_py.station.board import Board
from tests.conftest import popsicle_cmd
from tests.loopdev import Loop, fill_up, tiny_tmpfs
from tests.test_rev_grade_sign import _Events

MiB = 1 << 20


@pytest.mark.root
def test_a_drive_whose_certificate_could_not_be_written_fails_the_run(
        tmp_path: Path, loop_factory: Callable[..., Loop],
        faulty_drive: Callable[..., Any]) -> None:
    data = os.urandom(2 * MiB)
    image = tmp_path / "disk.img"
    image.write_bytes(data)
    plain = loop_factory(4 * MiB)
    held = faulty_drive(4 * MiB, hang=(MiB, 60))  # its body's write waits for clear()
    with tiny_tmpfs(tmp_path, "256k") as certs:
        proc = subprocess.Popen(
            [*popsicle_cmd(), "flash", str(image), plain.path, held.path, "--yes", "--json",
             "--no-probe", "--certificate", str(certs)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            said = _Events(proc)
            seen = said.until(lambda e: e["event"] == "result", 30)
            first = seen[-1]
            assert (first["device"], first["status"]) == (plain.path, "ok"), seen
            assert first["certificate"] and first["certificate_error"] is None, first
            fill_up(certs)  # the directory fills up while the other drive is written
            held.clear()
            rest = said.until(lambda e: e["event"] == "summary", 60)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert Path(str(first["certificate"])).exists()
        [second] = [e for e in rest if e["event"] == "result"]
        assert (second["device"], second["status"], second["certificate"]) == (
            held.path, "ok", None), second
        assert "No space left on device" in str(second["certificate_error"]), second
        notes = [str(e["text"]) for e in rest if e["event"] == "note"]
        assert any(n.startswith(f"{held.path}: no certificate: ") for n in notes), notes
        summary = rest[-1]
        assert summary["event"] == "summary" and summary["ok"] is False, summary
        assert proc.returncode == 1
        assert plain.read(len(data)) == data
        assert held.read(0, len(data)) == data  # written and verified all the same


def test_the_summary_names_the_drive_without_its_certificate() -> None:
    ok = events.DriveResult("/dev/sdb", events.Status.OK, MiB, verified=True,
                            certificate="/srv/certs/a.json")
    bare = events.DriveResult("/dev/sdc", events.Status.OK, MiB, verified=True,
                              certificate_error="No space left on device")
    failed = events.DriveResult("/dev/sdd", events.Status.FAILED, 0, "/dev/sdd: gone",
                                cause=events.Cause.REMOVED)
    summary = events.Summary((ok, bare))
    assert not summary.ok and summary.uncertified == (bare,)
    assert verdicts.summary_line(summary) == (
        "finished with problems: 2 of 2 drives ok; no certificate: /dev/sdc")
    assert verdicts.summary_line(events.Summary((ok, bare, failed))) == (
        "finished with problems: 2 of 3 drives ok; not ok: /dev/sdd failed (removed); "
        "no certificate: /dev/sdc")
    assert events.Summary((ok,)).ok
    assert verdicts.result_line(bare, "").startswith(
        "/dev/sdc: ok (1 MiB written and verified, no certificate: No space left on device)")


def test_a_station_tile_says_the_certificate_is_missing() -> None:
    board = Board.with_slots(("1",), image={"name": "x", "size": 1, "sha256": ""},
                             station={"name": "s", "id": "i", "started": 0.0})
    info = events.DriveInfo(1, "1-1")
    board.apply(events.DriveAdded("/dev/sdb", "stick", MiB, True, None, info), "1", 0.0)
    board.apply(events.Result(events.DriveResult(
        "/dev/sdb", events.Status.OK, MiB, verified=True, drive=info,
        certificate_error="No space left on device")), "1", 1.0)
    [tile] = board.snapshot(2.0)["slots"]
    assert (tile["state"], tile["why"]) == ("done", "no certificate: No space left on device")
