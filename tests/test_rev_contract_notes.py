"""flash --json says the confirmation's notes as ``note`` events.

README and man: ``note`` carries e.g. a drive ``--all-usb`` skipped.  Those notes (and the
warning that an image does not look like a disk image, or that a drive will be rejected by
``--capacity``) are the confirmation's; a script passes ``--yes`` and is asked nothing, and
``--json`` left them out: the script never learnt them.  They now follow the ``start`` event.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, popsicle_cmd

MiB = 1 << 20

pytestmark = pytest.mark.root


def test_flash_json_says_the_confirmation_notes_after_start(
        tmp_path: Path, loop_factory: Callable[..., Loop]) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MiB))  # no partition table: the confirmation warns
    loop = loop_factory(8 * MiB)
    done = subprocess.run([*popsicle_cmd(), "flash", "--json", "--yes", "--capacity", "1G",
                           str(image), loop.path], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60, check=False)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 1, done.stderr  # rejected by --capacity
    kinds = [e["event"] for e in events]
    start = kinds.index("start")
    notes = [e["text"] for e in events[start + 1:] if e["event"] == "note"]
    assert f"{image} has no partition table, ISO 9660 or file system signature at its start: " \
        "make sure it is a disk image" in notes, events
    assert any(n.startswith(f"{loop.path} will be rejected (not written)") for n in notes), notes
    assert kinds[-1] == "summary" and kinds.count("summary") == 1
    assert events[-1]["results"][0]["cause"] == "capacity"
