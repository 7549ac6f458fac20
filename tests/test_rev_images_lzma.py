"""An LZMA-alone (.lzma) file with a damaged header is refused, never written raw.

Its header has no magic: three fields (properties, dictionary, size) that liblzma checks.  A
byte damaged in one made the file "not lzma", hence a raw image: from standard input (no name
to doubt) or under a name that hints at nothing, the compressed bytes were written raw and
ended "ok".  Real loop devices, through the command.
"""

from __future__ import annotations

import lzma
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, needs_root, popsicle_cmd

pytestmark = needs_root

PATTERN = 0xA5
DRIVE = 4 << 20


def damaged(field: str) -> bytes:
    data = bytearray(os.urandom(1 << 20))
    data[510:512] = b"\x55\xaa"
    stream = bytearray(lzma.compress(bytes(data), format=lzma.FORMAT_ALONE, preset=0))
    if field == "size":  # unknown (all 0xFF) but for one bit: a size of 2^62 and more
        stream[12] ^= 0x40
    elif field == "known size":  # a size in the header, and a dictionary no longer 2^n
        stream[5:13] = len(data).to_bytes(8, "little")
        stream[3] ^= 0x01
    else:  # the properties byte, out of range (0x5D -> 0xFD; lc/lp/pb fit up to 224)
        stream[0] ^= 0xA0
    return bytes(stream)


@pytest.mark.parametrize("field", ["size", "known size", "properties"])
@pytest.mark.parametrize("way", ["stdin", "file"])
def test_a_damaged_lzma_header_is_refused(field: str, way: str, tmp_path: Path,
                                          loop_factory: Callable[..., Loop]) -> None:
    stream = damaged(field)
    path = tmp_path / "disk.img"  # a name that hints at no format
    path.write_bytes(stream)
    drive = loop_factory(DRIVE, fill=PATTERN)
    proc = subprocess.run([*popsicle_cmd(), "flash", "-" if way == "stdin" else str(path),
                           drive.path, "--yes", "--force"], capture_output=True,
                          input=stream if way == "stdin" else b"", timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 2, proc.stdout.decode() + err
    assert "has a damaged lzma header" in err
    assert len(err.strip().splitlines()) == 1
    assert drive.read() == bytes([PATTERN]) * DRIVE
