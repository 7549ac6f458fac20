"""``erase`` with a $TMPDIR that stores blocks of zeros as holes (ZFS with compression on, as an
Ubuntu installed on ZFS has it): mkfs wrote zeros over the FATs, the file reported them as
holes, and only the file's data was copied, so the drive's old bytes were left as the new
FAT.  fsck found a broken file system on a stick reported ok.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Loop, needs_root, popsicle_cmd

MiB = 1 << 20
PATTERN = 0x5A

pytestmark = needs_root


def holey_mkfs(folder: Path) -> dict[str, str]:
    """An environment whose mkfs tools make their zero blocks holes once done (``fallocate
    --dig-holes``: what such a file system does on its own)."""
    folder.mkdir()
    for name in ("mkfs.vfat", "mkfs.exfat"):
        real = shutil.which(name)
        if real is None:
            continue
        tool = folder / name
        tool.write_text("#!/bin/sh\nfor last; do :; done\n"
                        f"{real} \"$@\" || exit $?\nexec fallocate --dig-holes \"$last\"\n")
        tool.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


@pytest.mark.parametrize("fs", ["fat32", "exfat"])
def test_zeros_mkfs_wrote_reach_the_drive_even_as_holes(
        loop_factory: Callable[..., Loop], tmp_path: Path, fs: str) -> None:
    if shutil.which(f"mkfs.{'vfat' if fs == 'fat32' else fs}") is None:
        pytest.skip(f"needs mkfs for {fs}")
    drive = loop_factory(96 * MiB, fill=PATTERN)
    result = subprocess.run([*popsicle_cmd(), "erase", drive.path, "--yes", "--json",
                             "--fs", fs], capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL, env=holey_mkfs(tmp_path / "bin"),
                            check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["results"][0]["status"] == "ok"
    volume = tmp_path / "volume.img"
    volume.write_bytes(drive.read(offset=MiB, length=95 * MiB))
    fsck = subprocess.run([f"fsck.{'vfat' if fs == 'fat32' else fs}", "-n", str(volume)],
                          capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
