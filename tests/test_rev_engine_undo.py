"""A drive whose head's write fails at its first block: the stamp goes back over every block
of the head that takes it, not only up to that block.

The head is written from its end back to byte 0, so by the time its first block fails, the
rest of the image's head (ISO 9660 descriptors at 32 KiB, btrfs's superblock at 64 KiB, UDF
anchors) is on the drive; putting the stamp back from byte 0 stopped at that very block and
left all of that in place: the failed drive could still be taken for the image."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import needs_root, popsicle_cmd
from faulty import FaultyDrive, MiB

pytestmark = needs_root

IMAGE = 8 * MiB
HEAD = MiB
BLOCK = 4096


def test_a_head_whose_first_block_fails_is_stamped_over_all_the_rest(
        tmp_path: Path, faulty_drive: Callable[..., FaultyDrive]) -> None:
    content = os.urandom(IMAGE)
    image = tmp_path / "image.img"
    image.write_bytes(content)
    # Block 0 takes the stamp (its first write), then fails for good.
    drive = faulty_drive(32 * MiB, fill=0x5A, bad_write_from=(0, BLOCK, 2))
    proc = subprocess.run(
        [*popsicle_cmd(), "flash", str(image), drive.path, "--yes", "--json", "--no-probe",
         "--no-checksum"], capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL)
    events: list[dict[str, Any]] = [json.loads(line) for line in proc.stdout.splitlines()]
    (result,) = events[-1]["results"]
    assert proc.returncode == 1, proc.stderr
    assert result["status"] == "failed"
    drive.clear()
    held = drive.read(0, HEAD)
    kept = [offset for offset in range(0, HEAD, BLOCK)
            if held[offset : offset + BLOCK] == content[offset : offset + BLOCK]]
    assert kept == [], f"{len(kept)} blocks of the image's head left, from byte {kept[:1]}"
