"""--report on a disk that fills up mid-record: the record is cut off whole, so the file
stays one JSON object a line (and the next run's first record is not glued to a half)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.loopdev import Loop, tiny_tmpfs
from tests.test_report import image, run

pytestmark = pytest.mark.root


def test_a_record_cut_short_by_a_full_disk_is_not_left(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    path, _ = image(tmp_path, 1 << 20)
    with tiny_tmpfs(tmp_path, "16k") as disk:
        report = disk / "class.jsonl"
        earlier = json.dumps({"seq": 0, "note": "x" * 3800}) + "\n"
        report.write_text(earlier)  # one page, nearly full: the next record fits in part
        filler = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while os.write(filler, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(filler)
        loop = loop_factory(2 << 20)
        done = run("flash", path, loop.path, "--yes", "--report", report)
        assert done.returncode == 0, done.stderr
        assert "cannot write the report: No space left on device" in done.stderr + done.stdout
        assert report.read_text() == earlier
        os.unlink(disk / "filler")
        again = run("flash", path, loop.path, "--yes", "--report", report)
        assert again.returncode == 0, again.stderr
        lines = report.read_text().splitlines()
        assert [json.loads(line)["seq"] for line in lines] == [0, 1]
