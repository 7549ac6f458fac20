"""read and erase with --json say what a terminal shows first ("reading X into Y", "X: one
FAT32 partition") as ``note`` events, as flash says its confirmation's notes.

They were said only on a terminal or a log: a script learnt neither what OUTPUT's format would
be nor which file system each drive got, and a refusal after them (a drive that cannot be
opened) came to it without them.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, popsicle_cmd

MiB = 1 << 20

pytestmark = pytest.mark.root


def _events(*args: str) -> list[dict[str, object]]:
    done = subprocess.run([*popsicle_cmd(), *args, "--json"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_read_json_says_what_is_read_into_what_first(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    loop = loop_factory(8 * MiB)
    output = tmp_path / "copy.img.gz"
    events = _events("read", loop.path, str(output))
    assert events[0] == {"event": "note", "text": f"reading {loop.path} (8 MiB) into {output} "
                                                  "(gzip-compressed)"}
    assert events[-1]["event"] == "summary" and events[-1]["ok"] is True


def test_erase_json_says_what_each_drive_gets_first(loop_factory: Callable[..., Loop]) -> None:
    loop = loop_factory(40 * MiB)
    events = _events("erase", "--yes", loop.path)
    assert events[0] == {"event": "note", "text": f"{loop.path}: one FAT32 partition"}
    assert events[-1]["event"] == "summary" and events[-1]["ok"] is True
