"""A --bmap that never ends (a device node, a runaway generator) is refused in one line, before
it takes the machine's memory."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import popsicle_cmd


def test_a_bmap_without_end_is_refused_in_one_line(tmp_path: Path) -> None:
    image = tmp_path / "os.img"
    image.write_bytes(b"\x00" * (1 << 20))
    # Address space capped at 1 GiB: reading /dev/zero whole ended in MemoryError ("unexpected
    # error", exit 1), and without a cap in the machine's memory running out.
    proc = subprocess.run(["sh", "-c", 'ulimit -v 1000000; exec "$@"', "sh", *popsicle_cmd(),
                           "flash", str(image), "/dev/null", "--yes", "--bmap", "/dev/zero"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("popsicle-py: /dev/zero is larger than 64 MiB: not a block map\n")
