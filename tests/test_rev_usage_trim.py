"""A trimmed flash writes the image's head whole, and counts it: a bare file system whose free
blocks begin inside the head gets the image's bytes there, not the drive's old ones."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from conftest import Loop, needs_root, popsicle_cmd

from tests.fs_images import MiB, garbage, needs_fs_tools, run

pytestmark = [needs_root, needs_fs_tools]


def test_a_bare_fat_volume_s_head_is_written_whole(loop_factory: Callable[..., Loop],
                                                    tmp_path: Path) -> None:
    image = tmp_path / "fat.img"
    garbage(image, 40 * MiB)
    run("mkfs.vfat", "-F", "16", str(image))
    small = tmp_path / "f1"
    small.write_bytes(os.urandom(100 << 10))
    run("mcopy", "-i", str(image), str(small), "::f1",
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    drive = loop_factory(48 * MiB, fill=0x5A)
    proc = subprocess.run([*popsicle_cmd(), "flash", str(image), drive.path, "--yes",
                           "--no-probe", "--json"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = [json.loads(line) for line in proc.stdout.splitlines()][-1]["results"][0]
    assert drive.read(MiB) == image.read_bytes()[:MiB]  # the head: the image's, whole
    assert (result["bytes_written"], result["bytes_unused"]) == (MiB, 39 * MiB)
