"""A drive whose head's write fails at its first block: the stamp goes back over every block
of the head that takes it, not only up to that block.

The head is written from its end back to byte 0, so by the time its first block fails, the
rest of the image's head (ISO 9660 descriptors at 32 KiB, btrfs's superblock at 64 KiB, UDF
anchors) is on the drive; putting the stamp back from byte 0 stopped at that very block and
left all of that in place: the failed drive could still be taken for the image."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_root, popsicle_cmd
from faulty import FaultyDrive, MiB

from popsicle_py import BusWriter
from popsicle_py.errors import AllDestinationsFailed

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


class BadBlockAfterHead(io.BytesIO):
    """A whole head written, then it reads back wrong (a byte flipped) and the block at
    ``bad`` refuses every later write (a drive dying under its head's read-back)."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad = bad
        self.body_written = False
        self.head_written = False

    def write(self, data: Any) -> int:
        offset, length = self.tell(), len(memoryview(data))
        if self.head_written and offset < self.bad + BLOCK and self.bad < offset + length:
            raise OSError(errno.EIO, "Input/output error")
        n = super().write(data)
        if offset >= HEAD:
            self.body_written = True
        elif self.body_written and offset == 0:
            self.head_written = True  # its last call (the head goes from its end back)
        return n

    def readinto(self, buffer: Any) -> int:
        offset = self.tell()
        n = super().readinto(buffer)
        if self.head_written and offset == 0 and n:
            memoryview(buffer).cast("B")[0] ^= 1
        return n


@pytest.mark.parametrize("bad", [0, 512 << 10, HEAD - BLOCK])
def test_a_stamp_that_fails_at_one_block_still_goes_over_all_the_others(bad: int) -> None:
    """The head read back wrong, and the stamp's write fails at one block: every other block
    of the head takes the stamp (the partition table first); the failure is said."""
    payload = os.urandom(4 * MiB)
    dest = BadBlockAfterHead(bad)
    messages: list[Any] = []
    with pytest.raises(AllDestinationsFailed):
        BusWriter(io.BytesIO(payload), [dest], messages.append, lambda: False) \
            .bucket_size(256 << 10).retries(0).finish_each(verify=True, repairs=0).write()
    assert dest.head_written
    held = dest.getvalue()[:HEAD]
    kept = [offset for offset in range(0, HEAD, BLOCK)
            if held[offset : offset + BLOCK] == payload[offset : offset + BLOCK]]
    # At most the one call that failed, around the bad block; the partition table stamped
    # unless it is the bad block itself.
    assert all(abs(offset - bad) < 512 << 10 for offset in kept), kept[:4]
    assert len(kept) * BLOCK <= 512 << 10, len(kept)
    assert bad == 0 or held[:BLOCK] != payload[:BLOCK]
    undone = [m for m in messages if type(m).__name__ == "HeadUndone"]
    assert [m.done for m in undone] == [False]
